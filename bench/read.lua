-- wrk script of the read figure: GET /orders/{uid} on uids drawn at random from a file
-- (one uid a line, the file's path after `--`); prints a JSON summary line at the end.
local uids = {}

function init(args)
  for line in io.lines(args[1]) do
    uids[#uids + 1] = line
  end
  math.randomseed(os.time())
end

function request()
  return wrk.format("GET", "/orders/" .. uids[math.random(#uids)])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
