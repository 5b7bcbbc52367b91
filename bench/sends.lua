-- wrk script for sends.py: POST /send-sms, each request to a recipient of its own.
--
-- Arguments: <api key> <round>. The recipient is +1555<round><thread><counter>, so no
-- recipient reaches the per-recipient hourly limit. done() prints a `BENCH {...}` line with
-- the figures and one `SID <sid>` line per message SID answered with a 200.

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[1]}
   prefix = string.format("+1555%02d%d", tonumber(args[2]) % 100, tid % 10)
   issued, ok, client_errors, server_errors = 0, 0, 0, 0
   sids = {}
end

function request()
   issued = issued + 1
   local body = string.format('{"to": "%s%06d", "body": "Benchmark message %d"}',
                              prefix, issued, issued)
   return wrk.format("POST", "/send-sms", headers, body)
end

function response(status, headers, body)
   if status == 200 then
      ok = ok + 1
      sids[#sids + 1] = body:match('"messageSid":%s*"([^"]+)"') or "?"
   elseif status >= 500 then
      server_errors = server_errors + 1
   else
      client_errors = client_errors + 1
   end
end

function done(summary, latency, requests)
   local total = {issued = 0, ok = 0, client_errors = 0, server_errors = 0}
   for _, thread in ipairs(threads) do
      for name in pairs(total) do total[name] = total[name] + thread:get(name) end
      for _, sid in ipairs(thread:get("sids")) do io.write("SID ", sid, "\n") end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH {"duration_us": %d, "responses": %d, "issued": %d, "ok": %d, ' ..
      '"client_errors": %d, "server_errors": %d, "socket_errors": %d, "timeouts": %d, ' ..
      '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %d}\n',
      summary.duration, summary.requests, total.issued, total.ok, total.client_errors,
      total.server_errors, e.connect + e.read + e.write, e.timeout, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
