"""DifyClient against the Dify double over real HTTP on loopback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from wecom_bridge.dify.client import DifyAnswer, DifyClient, DifySettings, strip_reasoning
from wecom_bridge.errors import ConversationNotFoundError, DifyError, DifyPausedError
from wecom_bridge.metrics import Metrics
from wecom_bridge.testing.dify_double import DifyDoubleState, create_dify_double
from wecom_bridge.testing.server import ServerThread

API_KEY = "app-client-test-key"


@pytest.fixture
def dify_mode() -> str:
    return "chat"


@pytest.fixture
def dify_server(dify_mode: str) -> Iterator[ServerThread]:
    with ServerThread(create_dify_double(api_key=API_KEY, mode=dify_mode)) as server:
        yield server
        server.app.extensions["dify_double"].reset()  # release hanging handlers


def state_of(server: ServerThread) -> DifyDoubleState:
    return server.app.extensions["dify_double"]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(dify_server: ServerThread, sleeps: list[float]) -> Callable[..., DifyClient]:
    def make(metrics: Metrics | None = None, **overrides: object) -> DifyClient:
        options: dict = {
            "api_base": dify_server.url + "/v1",
            "api_key": API_KEY,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
        }
        options.update(overrides)
        return DifyClient(DifySettings(**options), metrics=metrics, sleep=sleeps.append)

    return make


def answer_requests(server: ServerThread) -> list[dict]:
    """What the client asked, without the app's info and input form it reads now and then."""
    return [
        r for r in state_of(server).snapshot() if r["path"] not in ("/v1/info", "/v1/parameters")
    ]


def test_streaming_chat_answer_is_assembled(make_client, dify_server) -> None:
    metrics = Metrics()
    answer = make_client(metrics).ask("什么是企业微信？", user="zhangsan")
    assert answer.text == "Dify double answer: 什么是企业微信？"
    assert answer.conversation_id
    assert answer.message_id
    (sent,) = answer_requests(dify_server)
    assert sent["path"] == "/v1/chat-messages"
    assert sent["json"]["user"] == "zhangsan"
    assert sent["json"]["response_mode"] == "streaming"
    assert sent["json"]["conversation_id"] == ""
    assert "wecom_bridge_dify_latency_seconds_count 1" in metrics.render()


def test_message_file_events_are_kept_with_the_answer(make_client, dify_server) -> None:
    answer = make_client().ask("画图 #image", user="zhangsan")
    (attached,) = answer.files
    assert (attached.type, attached.belongs_to) == ("image", "assistant")
    assert attached.url.startswith(f"/files/tools/{attached.id}.png?timestamp=")


def test_a_resumed_answer_brings_its_files_from_the_message_history(
    make_client, dify_server
) -> None:
    client = make_client()
    first = client.ask("画图 #image", user="li")
    ids = {"conversation_id": first.conversation_id, "message_id": first.message_id}
    resumed = client.resume(ids, "画图 #image", "li")
    assert resumed.files == first.files and resumed.text == first.text


def test_files_base_is_the_api_origin_unless_files_url_is_set() -> None:
    settings = DifySettings(api_base="http://127.0.0.1:8080/v1", api_key="k")
    assert settings.files_base == "http://127.0.0.1:8080"
    moved = DifySettings(api_base="http://dify/v1", api_key="k", files_url="https://kb.example/")
    assert moved.files_base == "https://kb.example"


def test_conversation_id_is_passed_on(make_client, dify_server) -> None:
    client = make_client()
    first = client.ask("one", user="u1")
    second = client.ask("two", user="u1", conversation_id=first.conversation_id)
    assert second.conversation_id == first.conversation_id
    assert answer_requests(dify_server)[1]["json"]["conversation_id"] == first.conversation_id


def test_app_mode_comes_from_info_once(make_client, dify_server) -> None:
    client = make_client()
    assert client.app_mode() == "chat"
    client.ask("a", user="u")
    client.ask("b", user="u")
    infos = [r for r in state_of(dify_server).snapshot() if r["path"] == "/v1/info"]
    assert len(infos) == 1
    assert client.info()["name"] == "Dify double"


def test_configured_app_mode_skips_info(make_client, dify_server) -> None:
    make_client(app_mode="chat").ask("q", user="u")
    paths = [r["path"] for r in state_of(dify_server).snapshot()]
    assert paths == ["/v1/parameters", "/v1/chat-messages"]


@pytest.mark.parametrize("dify_mode", ["agent-chat"])
def test_agent_messages(make_client, dify_server) -> None:
    answer = make_client().ask("use a tool", user="u")
    assert answer.text == "Dify double answer: use a tool"


@pytest.mark.parametrize("dify_mode", ["advanced-chat"])
def test_chatflow_workflow_events_are_ignored(make_client) -> None:
    assert make_client().ask("flow", user="u").text == "Dify double answer: flow"


def test_message_replace_replaces_the_answer(make_client, dify_server) -> None:
    state_of(dify_server).replace_next("该回答已被审核替换。")
    assert make_client().ask("something rude", user="u").text == "该回答已被审核替换。"


def test_error_event_raises_with_code(make_client, dify_server, sleeps) -> None:
    metrics = Metrics()
    state_of(dify_server).fail_next(
        400, "provider_quota_exceeded", "Your quota is used up.", in_stream=True
    )
    with pytest.raises(DifyError) as caught:
        make_client(metrics).ask("q", user="u")
    assert caught.value.code == "provider_quota_exceeded"
    assert caught.value.status == 400
    assert not caught.value.retryable
    assert sleeps == []
    errors = metrics.value("wecom_bridge_dify_errors_total", {"code": "provider_quota_exceeded"})
    assert errors == 1


def test_in_stream_internal_server_error_is_not_retried(make_client, dify_server, sleeps) -> None:
    """Dify turns only unrecognised exceptions into 500 internal_server_error: asking again
    would repeat the same failure (and the same cost)."""
    state_of(dify_server).fail_next(500, "internal_server_error", "boom", in_stream=True)
    with pytest.raises(DifyError) as caught:
        make_client().ask("q", user="u")
    assert caught.value.code == "internal_server_error"
    assert len(answer_requests(dify_server)) == 1
    assert sleeps == []


def test_in_stream_provider_error_is_retried(make_client, dify_server, sleeps) -> None:
    """Every provider failure (rate limit, 5xx, connection) arrives as 400
    completion_request_error inside a 200 stream: the one in-stream error worth another try."""
    metrics = Metrics()
    state_of(dify_server).fail_next(
        400, "completion_request_error", "[openai] Rate limit reached", in_stream=True
    )
    assert make_client(metrics).ask("q", user="u").text == "Dify double answer: q"
    assert len(answer_requests(dify_server)) == 2
    assert len(sleeps) == 1
    assert "wecom_bridge_dify_requests_per_message_sum 2" in metrics.render()


def test_in_stream_provider_error_gives_up_after_max_attempts(
    make_client, dify_server, sleeps
) -> None:
    state_of(dify_server).fail_next(
        400, "completion_request_error", "provider down", times=5, in_stream=True
    )
    with pytest.raises(DifyError) as caught:
        make_client(max_attempts=3).ask("q", user="u")
    assert caught.value.code == "completion_request_error"
    assert len(answer_requests(dify_server)) == 3
    assert len(sleeps) == 2


def posts(server: ServerThread) -> list[dict]:
    return [r for r in answer_requests(server) if r["method"] == "POST"]


def test_broken_stream_is_recovered_not_asked_again(make_client, dify_server, sleeps) -> None:
    """Dify recorded the message before the model ran: after a cut stream the answer is read
    back with GET /v1/messages, and the question is not POSTed a second time."""
    metrics = Metrics()
    state_of(dify_server).cut_next(times=1)
    answer = make_client(metrics).ask("q", user="u")
    assert answer.text == "Dify double answer: q"
    assert answer.conversation_id and answer.message_id
    assert len(posts(dify_server)) == 1
    (fetch,) = [r for r in answer_requests(dify_server) if r["path"] == "/v1/messages"]
    assert fetch["method"] == "GET"
    assert len(state_of(dify_server).messages) == 1
    assert metrics.value("wecom_bridge_dify_recoveries_total", {"outcome": "recovered"}) == 1
    assert "wecom_bridge_dify_requests_per_message_sum 1" in metrics.render()


def test_stalled_stream_answer_is_fetched_once_dify_finished(make_client, dify_server) -> None:
    """The stream stalls past the read timeout after Dify named the message; Dify goes on and
    finishes it; the bridge polls for it (real sleeps) instead of starting the model again."""
    state_of(dify_server).hang_next(1.0, mid_stream=True)
    client = DifyClient(
        DifySettings(
            api_base=dify_server.url + "/v1",
            api_key=API_KEY,
            app_mode="chat",
            read_timeout=0.3,
            backoff_base=0.2,
            recover_seconds=10,
        )
    )
    assert client.ask("slow", user="u").text == "Dify double answer: slow"
    assert len(posts(dify_server)) == 1


def test_stalled_stream_without_an_answer_in_time_is_lost_not_reasked(
    make_client, dify_server, sleeps
) -> None:
    metrics = Metrics()
    state_of(dify_server).hang_next(10, mid_stream=True, times=3)
    with pytest.raises(DifyError) as caught:
        make_client(metrics, read_timeout=0.3, recover_seconds=3).ask("q", user="u")
    assert caught.value.code == "stream_lost"
    assert not caught.value.retryable
    assert len(posts(dify_server)) == 1
    assert sum(sleeps) == pytest.approx(3)
    assert metrics.value("wecom_bridge_dify_recoveries_total", {"outcome": "lost"}) == 1


def test_failed_message_found_after_a_break_is_not_reasked(make_client, dify_server) -> None:
    """The message Dify recorded ended in an error: the member gets the fallback, Dify is not
    asked again."""
    state = state_of(dify_server)
    state.cut_next()
    client = make_client()
    original = state.message_view

    def failed(message: dict) -> dict:
        return {**original(message), "answer": "", "status": "error", "error": "model died"}

    state.message_view = failed  # type: ignore[method-assign]
    with pytest.raises(DifyError) as caught:
        client.ask("q", user="u")
    assert caught.value.code == "message_error"
    assert len(posts(dify_server)) == 1


def test_forgotten_conversation_starts_a_new_one(make_client, dify_server, sleeps) -> None:
    client = make_client()
    gone = "3f6d6b3e-0000-4000-8000-000000000000"
    answer = client.ask("hello again", user="u", conversation_id=gone)
    assert answer.text == "Dify double answer: hello again"
    assert answer.conversation_id and answer.conversation_id != gone
    sent = [r["json"]["conversation_id"] for r in answer_requests(dify_server)]
    assert sent == [gone, ""]
    assert sleeps == []


def test_conversation_id_dify_refuses_starts_a_new_one(make_client, dify_server, sleeps) -> None:
    """A stored id that is not a UUID is 400 invalid_param in Dify, not 404: also a new one."""
    answer = make_client().ask("hi", user="u", conversation_id="3f6d6b3e-gone")
    assert answer.text == "Dify double answer: hi"
    sent = [r["json"]["conversation_id"] for r in answer_requests(dify_server)]
    assert sent == ["3f6d6b3e-gone", ""]
    assert sleeps == []


def test_other_invalid_params_are_not_a_new_conversation(make_client, dify_server) -> None:
    client = make_client(app_mode="chat")
    conversation = client.ask("first", user="u").conversation_id
    state_of(dify_server).fail_next(400, "invalid_param", "query is required")
    with pytest.raises(DifyError) as caught:
        client.ask("q", user="u", conversation_id=conversation)
    assert not isinstance(caught.value, ConversationNotFoundError)
    assert len(answer_requests(dify_server)) == 2


def test_missing_conversation_without_an_id_is_not_looped(make_client, dify_server) -> None:
    state_of(dify_server).fail_next(404, "not_found", "Conversation Not Exists.", times=3)
    with pytest.raises(ConversationNotFoundError):
        make_client().ask("q", user="u")
    assert len(answer_requests(dify_server)) == 1


def test_wrong_key_is_not_retried(make_client, dify_server, sleeps) -> None:
    with pytest.raises(DifyError) as caught:
        make_client(api_key="app-wrong", app_mode="chat").ask("q", user="u")
    assert caught.value.status == 401
    assert caught.value.code == "unauthorized"
    assert not caught.value.retryable
    assert sleeps == []
    assert len(answer_requests(dify_server)) == 1


@pytest.mark.parametrize("status", [400, 403, 404])
def test_client_errors_are_not_retried(make_client, dify_server, sleeps, status: int) -> None:
    state_of(dify_server).fail_next(status, "invalid_param", "nope")
    with pytest.raises(DifyError) as caught:
        make_client(app_mode="chat").ask("q", user="u")
    assert caught.value.status == status
    assert caught.value.code == "invalid_param"
    assert sleeps == []


def test_server_errors_are_retried_with_backoff(make_client, dify_server, sleeps) -> None:
    state_of(dify_server).fail_next(500, "internal_server_error", "boom", times=2)
    answer = make_client(app_mode="chat", max_attempts=3, backoff_base=1.0).ask("q", user="u")
    assert answer.text == "Dify double answer: q"
    assert len(answer_requests(dify_server)) == 3
    assert len(sleeps) == 2
    assert 1.0 <= sleeps[0] <= 1.5
    assert 2.0 <= sleeps[1] <= 3.0


def test_too_many_requests_is_retried(make_client, dify_server, sleeps) -> None:
    state_of(dify_server).fail_next(429, "too_many_requests", "slow down")
    assert make_client(app_mode="chat").ask("q", user="u").text.endswith("q")
    assert len(sleeps) == 1


def test_server_errors_give_up_after_max_attempts(make_client, dify_server, sleeps) -> None:
    metrics = Metrics()
    state_of(dify_server).fail_next(503, "service_unavailable", "down", times=5)
    with pytest.raises(DifyError) as caught:
        make_client(metrics, app_mode="chat", max_attempts=3).ask("q", user="u")
    assert caught.value.status == 503
    assert caught.value.retryable
    assert len(sleeps) == 2
    assert metrics.value("wecom_bridge_dify_errors_total", {"code": "service_unavailable"}) == 1


def test_hang_longer_than_read_timeout_is_retried(make_client, dify_server, sleeps) -> None:
    state_of(dify_server).hang_next(10, times=1)
    answer = make_client(app_mode="chat", read_timeout=0.3).ask("q", user="u")
    assert answer.text == "Dify double answer: q"
    assert len(sleeps) == 1


def test_hang_every_time_ends_in_a_timeout_error(make_client, dify_server, sleeps) -> None:
    state_of(dify_server).hang_next(10, times=2)
    with pytest.raises(DifyError) as caught:
        make_client(app_mode="chat", read_timeout=0.3, max_attempts=2).ask("q", user="u")
    assert caught.value.code == "timeout"
    assert caught.value.retryable
    assert len(sleeps) == 1


def test_dify_down_is_a_retryable_network_error(sleeps) -> None:
    client = DifyClient(
        DifySettings(api_base="http://127.0.0.1:9/v1", api_key=API_KEY, app_mode="chat"),
        sleep=sleeps.append,
    )
    with pytest.raises(DifyError) as caught:
        client.ask("q", user="u")
    assert caught.value.code == "network"
    assert len(sleeps) == 2


@pytest.mark.parametrize("dify_mode", ["completion"])
def test_completion_app(make_client, dify_server) -> None:
    answer = make_client().ask("写一首诗", user="u")
    assert answer == DifyAnswer(answer.text, "", answer.message_id)
    assert answer.text == "Dify double answer: 写一首诗"
    (sent,) = answer_requests(dify_server)
    assert sent["path"] == "/v1/completion-messages"
    assert sent["json"]["inputs"] == {"query": "写一首诗"}


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_workflow_streams(make_client, dify_server) -> None:
    answer = make_client().ask("run it", user="u")
    assert answer.text == "Dify double answer: run it"
    (sent,) = answer_requests(dify_server)
    assert sent["path"] == "/v1/workflows/run"
    assert sent["json"]["response_mode"] == "streaming"
    assert sent["json"]["inputs"] == {"query": "run it"}


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_long_workflow_is_kept_alive_by_pings(make_client, dify_server) -> None:
    """A run longer than the read timeout is answered, and started once: the pings Dify sends
    while nodes run reset the per-read timeout (a blocking request would time out and re-run)."""
    state = state_of(dify_server)
    state.ping_interval = 0.2
    state.set_delay(1.5)
    answer = make_client(read_timeout=0.6).ask("long run", user="u")
    assert answer.text == "Dify double answer: long run"
    assert len(state.workflow_runs) == 1
    assert len(answer_requests(dify_server)) == 1


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_partially_succeeded_workflow_delivers_its_outputs(make_client, dify_server) -> None:
    state_of(dify_server).workflow_status_next("partial-succeeded")
    assert make_client().ask("q", user="u").text == "Dify double answer: q"


@pytest.mark.parametrize("dify_mode", ["workflow"])
@pytest.mark.parametrize("status", ["failed", "stopped"])
def test_failed_or_stopped_workflow_is_an_error(make_client, dify_server, sleeps, status) -> None:
    state_of(dify_server).workflow_status_next(status)
    with pytest.raises(DifyError) as caught:
        make_client().ask("q", user="u")
    assert caught.value.code == f"workflow_{status}"
    assert not caught.value.retryable
    assert len(answer_requests(dify_server)) == 1
    assert sleeps == []


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_paused_workflow_is_reported_with_its_run_id(make_client, dify_server) -> None:
    state = state_of(dify_server)
    state.workflow_status_next("paused")
    with pytest.raises(DifyPausedError) as caught:
        make_client().ask("needs approval", user="u")
    assert caught.value.run_id in state.workflow_runs
    assert len(answer_requests(dify_server)) == 1


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_broken_workflow_stream_is_recovered_from_the_run(make_client, dify_server) -> None:
    state = state_of(dify_server)
    state.cut_next()
    answer = make_client().ask("q", user="u")
    assert answer.text == "Dify double answer: q"
    assert len(state.workflow_runs) == 1
    paths = [r["path"] for r in answer_requests(dify_server)]
    assert paths == ["/v1/workflows/run", f"/v1/workflows/run/{answer.message_id}"]


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_stalled_workflow_is_polled_until_it_ends(make_client, dify_server, sleeps) -> None:
    state = state_of(dify_server)
    state.hang_next(0.8, mid_stream=True)
    client = DifyClient(
        DifySettings(
            api_base=dify_server.url + "/v1",
            api_key=API_KEY,
            read_timeout=0.3,
            backoff_base=0.2,
            recover_seconds=10,
        )
    )
    assert client.ask("q", user="u").text == "Dify double answer: q"
    assert len(state.workflow_runs) == 1


def test_reasoning_is_removed_by_default(make_client, dify_server) -> None:
    state_of(dify_server).reasoning = "用户在问企业微信，我先想一想……"
    answer = make_client().ask("q", user="u")
    assert answer.text == "Dify double answer: q"
    kept = make_client(strip_reasoning=False).ask("q", user="u").text
    assert kept.startswith("<think>") and kept.endswith("Dify double answer: q")


def test_strip_reasoning_forms() -> None:
    assert strip_reasoning("<think>a\nb</think>\n\n答案") == "答案"
    assert strip_reasoning("<think>never closed") == ""
    details = '<details style="color:gray" open> <summary> Thinking... </summary>想</details>答案'
    assert strip_reasoning(details) == "答案"
    assert strip_reasoning("no <b>thinking</b> here") == "no <b>thinking</b> here"


def test_workflow_output_pick() -> None:
    pick = DifyClient(DifySettings(api_base="http://x/v1", api_key="k"))._pick_output
    assert pick({"answer": "a", "text": "t"}) == "a"
    assert pick({"result": "r", "count": 3}) == "r"
    assert pick({"summary": "only string", "n": 1}) == "only string"
    with pytest.raises(DifyError, match="which workflow output"):
        pick({"a": "1", "b": "2"})
    chosen = DifyClient(
        DifySettings(api_base="http://x/v1", api_key="k", workflow_output="data")
    )._pick_output
    assert chosen({"answer": "no", "data": {"k": "值"}}) == '{"k": "值"}'
    with pytest.raises(DifyError, match="no output 'data'"):
        chosen({"answer": "no"})


def test_unknown_app_mode_is_an_error() -> None:
    client = DifyClient(DifySettings(api_base="http://x/v1", api_key="k", app_mode="chatbot"))
    with pytest.raises(DifyError, match="unsupported"):
        client.ask("q", user="u")


def test_long_answer_comes_back_whole(make_client, dify_server) -> None:
    text = "很长的回答。" * 900
    state_of(dify_server).set_answer(text)
    assert make_client().ask("q", user="u").text == text


def test_api_key_never_logged(make_client, dify_server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    state_of(dify_server).fail_next(500, "internal_server_error", "boom")
    make_client().ask("q", user="u")
    with pytest.raises(DifyError):
        make_client(api_key="app-wrong-key").ask("q", user="u")
    assert API_KEY not in caplog.text
    assert "app-wrong-key" not in caplog.text
    assert all("Authorization" not in str(r) for r in state_of(dify_server).snapshot())


# --- inputs -------------------------------------------------------------------------------


DEPT_FORM = [{"text-input": {"variable": "dept", "label": "部门", "required": True}}]


def test_required_input_without_a_value_is_not_asked(make_client, dify_server, sleeps) -> None:
    """Dify refuses every message that lacks a required input (400 invalid_param): the
    client says which input is missing and does not POST the question at all."""
    state_of(dify_server).set_input_form(DEPT_FORM)
    with pytest.raises(DifyError) as caught:
        make_client().ask("q", user="u")
    assert caught.value.code == "input_missing"
    assert "'dept'" in str(caught.value) and "DIFY_INPUTS" in str(caught.value)
    assert answer_requests(dify_server) == []
    answer = make_client(inputs={"dept": "HR", "typo": "x"}).ask("q", user="u")
    assert answer.text == "Dify double answer: q"
    (sent,) = answer_requests(dify_server)
    assert sent["json"]["inputs"] == {"dept": "HR", "typo": "x"}
    assert state_of(dify_server).messages[-1]["inputs"] == {"dept": "HR"}  # Dify dropped typo


def test_input_form_is_cached_and_reread_when_dify_says_it_changed(
    make_client, dify_server
) -> None:
    client = make_client()
    client.ask("one", user="u")
    client.ask("two", user="u")
    reads = [r for r in state_of(dify_server).snapshot() if r["path"] == "/v1/parameters"]
    assert len(reads) == 1  # cached
    state_of(dify_server).set_input_form(DEPT_FORM)  # the app now requires an input
    with pytest.raises(DifyError) as first:
        client.ask("three", user="u")
    assert first.value.code == "invalid_param"  # Dify's 400, then the form is read again
    with pytest.raises(DifyError) as second:
        client.ask("four", user="u")
    assert second.value.code == "input_missing"
    assert [r["json"]["query"] for r in answer_requests(dify_server)] == ["one", "two", "three"]


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_query_input_names_the_workflow_variable(make_client, dify_server) -> None:
    state_of(dify_server).set_input_form(
        [
            {"paragraph": {"variable": "question", "label": "问题", "required": True}},
            {"text-input": {"variable": "lang", "label": "语言", "required": False}},
        ]
    )
    with pytest.raises(DifyError, match="DIFY_QUERY_INPUT=query is not an input"):
        make_client().ask("q", user="u")
    answer = make_client(query_input="question", inputs={"lang": "zh"}).ask("请假", user="u")
    assert answer.text == "Dify double answer: 请假"
    assert answer_requests(dify_server)[-1]["json"]["inputs"] == {"lang": "zh", "question": "请假"}


@pytest.mark.parametrize("dify_mode", ["workflow"])
def test_a_workflow_s_file_outputs_become_the_answer_s_files(make_client, dify_server) -> None:
    answer = make_client().ask("出图 #image", user="wf")
    assert answer.text == "Dify double answer: 出图 #image"  # the answer output, not the files
    (attached,) = answer.files
    assert attached.type == "image" and attached.filename.endswith(".png")
    assert attached.url.startswith("/files/tools/")
