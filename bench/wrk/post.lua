-- wrk script: POSTs one query (the file named by WRK_BODY_FILE) to WRK_PATH (default "/") on
-- every request, and prints one machine-readable RESULT line at the end: request count, duration,
-- latency percentiles in microseconds, and every error wrk counts (connect, read, write, timeout,
-- and status >= 400).
-- With WRK_COUNT_PREAGG=1 it also reads the X-Preagg header of every response and prints how many
-- answers were rewritten (costs some load-generator CPU: only for slow upstreams).
-- With WRK_CONNECTION_CLOSE=1 every request asks for its connection to be closed after the answer,
-- so each request opens a new one (TCP and, over HTTPS, a full TLS handshake). wrk starts a
-- request's latency clock once its connection is up: then the handshake shows in requests/s and
-- in the hop's CPU time per request, not in the latency percentiles.

local function read_file(path)
    local file = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
    local text = file:read("*a")
    file:close()
    return text
end

wrk.method = "POST"
wrk.path = os.getenv("WRK_PATH") or "/"
wrk.body = read_file(os.getenv("WRK_BODY_FILE"))
wrk.headers["Content-Type"] = "text/plain; charset=UTF-8"
if os.getenv("WRK_CONNECTION_CLOSE") == "1" then
    wrk.headers["Connection"] = "close"
end

local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

if os.getenv("WRK_COUNT_PREAGG") == "1" then
    rewritten = 0
    other = 0
    function response(status, headers, body)
        local value = headers["x-preagg"] or headers["X-Preagg"] or ""
        if string.sub(value, 1, 9) == "rewritten" then
            rewritten = rewritten + 1
        else
            other = other + 1
        end
    end
end

function done(summary, latency, requests)
    local rewritten_total, other_total = 0, 0
    for _, thread in ipairs(threads) do
        rewritten_total = rewritten_total + (thread:get("rewritten") or 0)
        other_total = other_total + (thread:get("other") or 0)
    end
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
        "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d rewritten=%d not_rewritten=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout, e.status,
        rewritten_total, other_total))
end
