#!/usr/bin/env bash
# What each Redis call of purchase.lua costs: instructions per call, counted
# by callgrind in a redis-server that runs the script (and copies of it with
# one call taken out) under redis-benchmark's accept-path load, each call a
# new buyer. Instruction counts do not move with the machine's load, unlike
# calls/s, so a difference of a few percent is real; docs/BENCHMARKS.md keeps
# the results. Needs valgrind, redis-server and redis-benchmark.
#
#   scripts/purchase-script-costs.sh [calls per variant, default 20000] [script | keyed | batch]
#
# `batch` counts instructions per decision when one call decides several
# purchases (a wrapper that runs purchase.lua as a function for each; not a
# script the product runs): what the per-call floor costs each decision.
#
# `keyed` counts a purchase with an Idempotency-Key instead: the key's binding
# (claim.lua) and the purchase as two calls, as on a Redis Cluster, beside the
# one call that does both on a standalone Redis (scripts::CLAIM_AND_PURCHASE).
#
# An earlier script (key layout 1, `git show 19f4eda:dataplane/src/scripts/purchase.lua`)
# is run with its own eight keys; the variants are for the current one.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-20000}
script=${2:-dataplane/src/scripts/purchase.lua}
for bin in valgrind callgrind_control redis-server redis-benchmark redis-cli; do
  command -v "$bin" >/dev/null || { echo "$bin not found (apt-get install -y valgrind redis-server redis-tools)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tag='{cost/sale/item}'
keys="7 fs:$tag:info fs:$tag:stock fs:$tag:buyers fs:$tag:idem fs:$tag:orders fs:$tag:stream fs:$tag:clock"
layout1=
if [ -f "$script" ] && grep -q "^-- KEYS: 1 info, 2 stock, 3 buyers, 4 users" "$script"; then
  layout1=yes
  keys="8 fs:$tag:info fs:$tag:stock fs:$tag:buyers fs:$tag:users fs:$tag:idem fs:$tag:orders fs:$tag:stream fs:$tag:clock"
fi

run() { # variant [numkeys keys… args…, default the purchase's] -> instructions per call
  local out="$work/cg.$1"
  local v=$1
  shift
  local call=("$@")
  [ ${#call[@]} -gt 0 ] || call=($keys u__rand_int__ 1 item.o__rand_int__ '')
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    redis-server --port "$port" --save '' --appendonly no >/dev/null 2>"$work/valgrind.log" &
  local pid=$!
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.2; done
  local cli="redis-cli -p $port"
  local sha
  sha=$($cli script load "$(cat "$work/$v.lua")")
  $cli hset "fs:$tag:info" stock 1000000000 price 19.99 limit 5 start_ms 0 end_ms 4102444700000 \
    rules '2 0 4102444700000 5 19.99' >/dev/null
  $cli set "fs:$tag:stock" 1000000000 >/dev/null
  # $calls buyers first, so the hashes are not tiny; then count $calls more.
  # $per decisions per call (batch mode): as many decisions, fewer calls.
  local bench=(redis-benchmark -p "$port" -n "$((calls / per))" -c 50 -P 16 -r 100000000 -q
    evalsha "$sha" "${call[@]}")
  "${bench[@]}" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  "${bench[@]}" >/dev/null
  callgrind_control -d "$pid" >/dev/null 2>&1
  $cli shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  awk -v n="$calls" '/^summary:/ { printf "%.0f", $2 / n }' "$out.1"
}

src=dataplane/src/scripts
# purchase.lua as a Lua function of its KEYS and ARGV, for scripts that call it.
purchase_function() { echo "local function purchase(KEYS, ARGV)"; cat $src/purchase.lua; echo "end"; }

per=1
if [ "$script" = batch ]; then
  cp $src/purchase.lua "$work/purchase.lua"
  # ARGV: the number of purchases, then user, quantity, order id and
  # idempotency field of each; the answers of all, three strings each.
  { purchase_function
    cat <<'LUA'
local out, j = {}, 2
for _ = 1, tonumber(ARGV[1]) do
  local r = purchase(KEYS, {ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]})
  if type(r) == 'number' then r = {'ok', ARGV[j + 2], r} end
  out[#out + 1], out[#out + 2], out[#out + 3] = r[1], r[2], r[3]
  j = j + 4
end
return out
LUA
  } >"$work/batch.lua"
  echo "instructions per decision, $calls decisions each, every one a new buyer ($(redis-server --version | cut -d' ' -f3))"
  printf '%-34s %8s\n' "purchase.lua, one per call" "$(run purchase)"
  for per in 1 4 16; do
    args=("$per")
    for _ in $(seq "$per"); do args+=(u__rand_int__ 1 item.o__rand_int__ ''); done
    printf '%-34s %8s\n' "$per per call (wrapper)" "$(run batch $keys "${args[@]}")"
  done
  exit 0
fi

if [ "$script" = keyed ]; then
  { cat $src/claim.lua; echo "return {claimed, ARGV[2], ''}"; } >"$work/claim_key.lua"
  cp $src/purchase.lua "$work/purchase.lua"
  { cat $src/claim.lua; purchase_function
    echo "return purchase({unpack(KEYS, 2)}, {unpack(ARGV, 4)})"; } >"$work/claim_and_purchase.lua"
  idem="fs:{cost/sale}:idem"
  until=4102444700000
  echo "instructions per keyed purchase, $calls calls each, every call a new key ($(redis-server --version | cut -d' ' -f3))"
  claim=$(run claim_key 1 "$idem" k__rand_int__ 'item 1' $until)
  purchase=$(run purchase $keys u__rand_int__ 1 item.o__rand_int__ k__rand_int__)
  both=$(run claim_and_purchase ${keys/#7/8 $idem} k__rand_int__ 'item 1' $until u__rand_int__ 1 item.o__rand_int__ k__rand_int__)
  printf '%-34s %8s\n' "claim_key.lua" "$claim" "purchase.lua with a key" "$purchase" \
    "the two calls" "$((claim + purchase))" "claim and purchase in one call" "$both"
  exit 0
fi

# Variants: the script, an empty one with the same keys and arguments (the
# floor of any call), and the script with one call replaced by its answer.
cp "$script" "$work/all.lua"
# The empty script answers as an accepted purchase does: one integer.
echo "return 0" >"$work/empty.lua"
variant() { # name, sed expression
  sed "$2" "$script" >"$work/$1.lua"
  if cmp -s "$script" "$work/$1.lua"; then
    echo "variant $1 changed nothing: update its pattern to the script" >&2
    exit 1
  fi
}
[ -z "$layout1" ] || {
  echo "instructions per call, $calls calls each (layout 1 script)"
  printf '%-34s %8s\n' "purchase.lua (layout 1)" "$(run all)" "empty script (same keys, args)" "$(run empty)"
  exit 0
}
variant no_rules "s/redis.call('HGET', KEYS\[1\], 'rules')/'2 0 4102444700000 5 19.99'/"
variant no_clock "s/redis.call('PTTL', KEYS\[7\])/2306239589441/"
variant no_stock "s/redis.call('DECRBY', KEYS\[2\], q)/5/"
variant no_buyer "s/redis.call('HSETNX', KEYS\[3\], user, q .. ' 1 ' .. oid) == 0/false/"
variant no_record "/^redis.call('HSET', KEYS\[5\]/d"
variant no_stream "/^redis.call('XADD', KEYS\[6\]/d"

echo "instructions per call, $calls calls each ($(redis-server --version | cut -d' ' -f3))"
all=$(run all)
empty=$(run empty)
printf '%-34s %8s\n' "purchase.lua" "$all" "empty script (same keys, args)" "$empty"
for v in no_rules no_clock no_stock no_buyer no_record no_stream; do
  n=$(run "$v")
  printf '%-34s %8s   the call costs %6s\n' "without ${v#no_}" "$n" "$((all - n))"
done
