-- wrk script for bench/serving.py's closed-loop runs: each connection posts /recommend back to
-- back, for (user, scenario) bodies drawn at random from the file named after `--` (one JSON body
-- per line). Only a 200 whose body holds an items list counts as a success. done() prints one
-- JSON line (prefixed "WRK_RESULT ") that the bench parses: counts, wrk's socket error classes and
-- the latency percentiles in microseconds (a non-200 is already among the failures).

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
  if #bodies == 0 then
    error("no request bodies in " .. tostring(args[1]))
  end
  math.randomseed(os.time() * 1000 + id)
  failures = 0
  wrk.method = "POST"
  wrk.path = "/recommend"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  return wrk.format(nil, nil, nil, bodies[math.random(#bodies)])
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"items"%s*:%s*%[') then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, t in ipairs(threads) do
    failed = failed + t:get("failures")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "failures": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, failed, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
