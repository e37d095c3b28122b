-- create.lua - wrk script for bench.sh: every request is a Create with a key
-- no other request used (run prefix + wrk thread + counter).
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
end

function init(args)
  prefix = string.format("bench-%s-%d-", args[1] or os.time(), tid or 0)
  n = 0
  headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. (args[2] or "bench"),
  }
end

function request()
  n = n + 1
  local key = prefix .. n
  headers["Idempotency-Key"] = key
  local body = '{"idempotency_key":"' .. key ..
    '","amount":1250,"currency":"EUR","account":"acct-42","reference":"order-' .. n .. '"}'
  return wrk.format("POST", "/v1/payments", headers, body)
end
