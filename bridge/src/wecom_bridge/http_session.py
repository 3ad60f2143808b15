"""HTTP sessions for the bridge's upstreams (Dify's API, WeCom's API).

With `trust_env` on, requests reads the environment on every call: the proxy variables (walking
all of `os.environ`, twice), NO_PROXY, `~/.netrc` and the CA-bundle variables — about 0.7 ms of
CPU per call measured here, more than the rest of the call's own work. A client talks to one
base URL for its whole life, so this is resolved once, when its session is made, by the same
rules: HTTP(S)_PROXY / ALL_PROXY unless NO_PROXY names the host, REQUESTS_CA_BUNDLE or
CURL_CA_BUNDLE for the trust store.

requests keeps 10 connections per host. Beyond that, every call the job workers make at once
opens a new connection (a TCP and TLS handshake with a real Dify or WeCom) and closes it after, with
a WARNING ("Connection pool is full") each time: 1,143 of them for 3,000 answers with 64 workers.
A session here keeps as many as its client's callers can use at once.
"""

from __future__ import annotations

import os

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies

# Hosts a session keeps pools for: its base URL's, and a few more (Dify's file links when
# FILES_URL names another origin).
_HOSTS = 4


def session_for(base_url: str, *, connections: int = 10) -> requests.Session:
    """A session for requests under `base_url`, the environment's settings fixed now, keeping
    up to `connections` open per host: as many threads as call through it at once."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=_HOSTS, pool_maxsize=max(1, connections))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False
    session.proxies.update(get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session
