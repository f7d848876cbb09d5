-- wrk script for bench/serve.py: POST pre-built multipart bodies in rotation and write a JSON summary.
--
-- Environment (set by bench/serve.py):
--   WRK_BODY_DIR      folder holding body_0.bin .. body_<n-1>.bin (complete multipart bodies)
--   WRK_BODY_COUNT    n
--   WRK_CONTENT_TYPE  the Content-Type header (multipart/form-data; boundary=...)
--   WRK_PATH          request path, e.g. /classify
--   WRK_OUT           where done() writes the JSON summary
-- Example: wrk -t1 -c32 -d10s --timeout 10s -s bench/serve_wrk.lua http://127.0.0.1:3000/classify

local dir = os.getenv("WRK_BODY_DIR")
local count = tonumber(os.getenv("WRK_BODY_COUNT") or "0")
local content_type = os.getenv("WRK_CONTENT_TYPE")
local path = os.getenv("WRK_PATH") or "/classify"
local out = os.getenv("WRK_OUT")

local requests_ = {}
local next_index = 0

function init(args)
  for k = 0, count - 1 do
    local f = assert(io.open(dir .. "/body_" .. k .. ".bin", "rb"))
    local body = f:read("*all")
    f:close()
    requests_[k + 1] = wrk.format("POST", path, {["Content-Type"] = content_type}, body)
  end
  next_index = math.random(count) - 1  -- threads start at different bodies
end

function request()
  next_index = next_index % count + 1
  return requests_[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  local f = assert(io.open(out, "w"))
  f:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "stdev": %.1f, "min": %d, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
  f:close()
end
