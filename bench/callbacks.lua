-- wrk script for webhooks.py: sends pre-signed Twilio status callbacks, each at most once.
--
-- Arguments: <file> <threads> [<signature> [<path>]]. Each line of <file> is
-- "<signature>\t<form body>"; <path> is where they go (default /message-status: inbound.py
-- sends Twilio's incoming messages to /inbound-sms with it).
-- wrk thread k of n takes lines k, k+n, k+2n, ...: threads never share a request, and each
-- request() hands out the next unsent one. With <signature> given, every request carries
-- that (wrong) signature instead. When a thread runs out, it sends GET /pool-exhausted,
-- counted separately, so a too small pool is reported rather than re-sending callbacks.

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   local file, nthreads, forced, path = args[1], tonumber(args[2]), args[3], args[4]
   if forced == "" then forced = nil end
   path = path or "/message-status"
   reqs, issued, exhausted = {}, 0, 0
   acked, duplicates, rejected, other, server_errors = 0, 0, 0, 0, 0
   local line_no = 0
   for line in io.lines(file) do
      if line_no % nthreads == tid then
         local signature, body = line:match("^([^\t]+)\t(.*)$")
         reqs[#reqs + 1] = wrk.format("POST", path, {
            ["Content-Type"] = "application/x-www-form-urlencoded",
            ["X-Twilio-Signature"] = forced or signature,
         }, body)
      end
      line_no = line_no + 1
   end
   exhausted_request = wrk.format("GET", "/pool-exhausted")
end

function request()
   issued = issued + 1
   local r = reqs[issued]
   if r == nil then
      exhausted = exhausted + 1
      return exhausted_request
   end
   return r
end

function response(status, headers, body)
   if status == 200 then
      if body:find('"duplicate":%s*true') then duplicates = duplicates + 1 else acked = acked + 1 end
   elseif status == 403 then
      rejected = rejected + 1
   elseif status >= 500 then
      server_errors = server_errors + 1
   else
      other = other + 1
   end
end

function done(summary, latency, requests)
   local total = {}
   local names = {"issued", "exhausted", "acked", "duplicates", "rejected", "other",
                  "server_errors"}
   for _, name in ipairs(names) do
      total[name] = 0
      for _, thread in ipairs(threads) do total[name] = total[name] + thread:get(name) end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH {"duration_us": %d, "responses": %d, "issued": %d, "exhausted": %d, ' ..
      '"acked": %d, "duplicates": %d, "rejected": %d, "other": %d, "server_errors": %d, ' ..
      '"socket_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d}\n',
      summary.duration, summary.requests, total.issued, total.exhausted, total.acked,
      total.duplicates, total.rejected, total.other, total.server_errors,
      e.connect + e.read + e.write, e.timeout, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency.max))
end
