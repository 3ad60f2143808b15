-- wrk script: replays pre-built requests, one per line of the file given after `--`
-- ("<path?query>\t<body>", POSTed as text/xml), split across wrk's threads; with no file,
-- wrk's own request (the static ceiling). Prints one "WRK_JSON {...}" line for stack_bench.py.
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  requests_file, thread_count = args[1], tonumber(args[2] or "1")
  prepared, position, wrapped = {}, 0, 0
  if requests_file == nil then
    return
  end
  local line_number = 0
  for line in io.lines(requests_file) do
    if line_number % thread_count == id then
      local path, body = line:match("^([^\t]*)\t(.*)$")
      prepared[#prepared + 1] = wrk.format("POST", path, { ["Content-Type"] = "text/xml" }, body)
    end
    line_number = line_number + 1
  end
end

function request()
  if #prepared == 0 then
    return wrk.request()
  end
  position = position + 1
  if position > #prepared then
    -- Out of distinct messages: what follows are redeliveries. Reported, so the run is resized.
    position, wrapped = 1, wrapped + 1
  end
  return prepared[position]
end

function done(summary, latency, requests)
  local wrapped_total = 0
  for _, thread in ipairs(threads) do
    wrapped_total = wrapped_total + (thread:get("wrapped") or 0)
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "p999_us": %d, '
      .. '"max_us": %d, "non_2xx": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "wrapped": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max, errors.status, errors.connect, errors.read,
    errors.write, errors.timeout, wrapped_total))
end
