-- wrk script for every perf scenario. Settings come from the environment (set by perf/run.py):
--   PERF_BODY    file whose content is POSTed (absent: GET)
--   PERF_PATH    request path (default /v1/chat/completions)
--   PERF_STREAM  "1": ask the mock for the SSE reply with `x-mock-stream: 1` (nginx mock cannot read the body)
--   PERF_KEY     API key sent as a bearer token (the policies scenario)
--   PERF_HEADERS extra request headers, one "name: value" a line (the paced streams' x-mock-* knobs)
-- No request()/response() callbacks: wrk then builds the request once and never enters Lua per request,
-- so the load generator stays as cheap as possible. done() prints one JSON line for the driver to parse.

local path = os.getenv("PERF_PATH") or "/v1/chat/completions"
local body_file = os.getenv("PERF_BODY")

wrk.path = path
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.0"
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
else
  wrk.method = "GET"
end
if os.getenv("PERF_STREAM") == "1" then
  wrk.headers["x-mock-stream"] = "1"
  wrk.headers["Accept"] = "text/event-stream"
end
for line in (os.getenv("PERF_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end
local key = os.getenv("PERF_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

-- PERF_DELAY_MS: each connection waits this long between its requests (perf/latency.py: a load below the
-- gateway's capacity, since wrk has no rate option); only then is delay() defined, at a Lua call per request.
local delay_ms = tonumber(os.getenv("PERF_DELAY_MS") or "")
if delay_ms then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  -- latency values are microseconds; errors.status counts responses with status >= 400
  io.write(string.format(
    'PERF_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p95":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency:percentile(99.9)))
end
