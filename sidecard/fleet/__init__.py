"""Fleet mode: every sidecar of an app shares one budget, one set of limits, one kill switch, one release, one
cache and one quality window, through a Redis 7+ or Valkey 7+ store (issue 19). No `[fleet]` section: nothing
here runs, and everything stays local.

Modules (I/O at the edges; the daemon wires them in):
  settings    the `[fleet]` section (`FleetSettings`): url (redis://, rediss://, unix://), namespace, instance,
              op_timeout_ms, fail modes per scope, intervals, breaker, cache and quality settings
  connection  one multiplexed Trio connection: per-operation deadline, own breaker, reconnect with backoff
  pubsub      one subscriber connection per sidecar, dispatching change messages by channel
  scripts     the request path's operations (`RequestPath`: admit, settle, cache_put, leases) and their Lua
  coalesce    followers of a coalescing leader elsewhere in the fleet
  flushes     `sidecardctl cache flush` for the fleet: marks the shared cache honours, `FlushFollower`
  state       operator state: compare-and-set document, change messages, `StateWatcher` (local copy, resync)
  heartbeat   live instances and what they run; `disagreements`
  quality     fleet-wide quality counts in time buckets; `decide`
  health      `FleetHealth`: up/down (`sidecard_fleet_up`), errors, fallbacks, latency, as hooks
  devserver   a throwaway redis-server for tests and benchmarks

The client. hiredis's sans-I/O `Reader` (and its `pack_command`) under our own Trio connection, not coredis.
Measured here (bench/fleet_client.py, one request-shaped EVALSHA, redis-server 7.0 on a Unix socket, client CPU
per round trip, a shared 2-core machine, several runs): hiredis's Reader on a bare Trio socket 19-20 µs (the
floor); our connection 40-54 µs at concurrency 1 (p50 50-53 µs) and 18 µs at 32; coredis 6.9 172-195 µs at 1
(p50 164-176 µs) and 92-95 µs at 32. So 3-4x less CPU, and the connection owns what the request path needs
and a general client hides: each operation's deadline, the breaker, and the reply of an operation given up on
(`on_late`: an admission answered too late is given back). What it costs: no Sentinel or Cluster. Every key of
a namespace carries the `{namespace}` hash tag, so a Cluster could serve a namespace from one slot, but this
client follows no redirections: point it at a primary (or a proxy that does).

The whole request path (bench/fleet_store.py: three buckets, two budgets with a reservation, the shared cache
lookup and the lease in one script): client CPU 75-85 µs a request at concurrency 1 (+70-80 µs over doing the
same locally), 42-44 µs at 32; latency p50 118-122 µs at 1; the server spends 45-55 µs per script run. The
settle and the shared cache write after each answer are background writes (`Connection.run_script_later`):
their bytes ride with the next operation's write (or go on their own a couple of scheduler passes later) and
the reader hands each reply to its callback, so they cost no task, no wait and no wake-up of their own
(bench/fleet.py, 10 busy daemons: fleet mode's added CPU per request went from 0.66-0.74 ms to 0.48-0.52 ms).

Key layout (every key and channel starts with `{ns}:`, ns = `namespace`):
  {ns}:schema                  string "sidecard-fleet/1"; set by the first script run. A namespace holding
                               another value is refused whole (StoreDataError), before anything is touched
  {ns}:rl:r:<scope key>        GCRA theoretical arrival time (unix seconds) of a requests-per-minute limit;
  {ns}:rl:t:<scope key>        ... of a tokens-per-minute limit. Expire once the bucket is full again
  {ns}:b:<window>:<scope key>  hash: budget spend. day/month: start, spent, reserved; hour: one field per
                               unix minute (usd), reserved. Expire a day after the window (hour: 2 h idle)
  {ns}:res, {ns}:resv          in-flight reservations: zset id -> unix time it lapses; hash id -> "usd\\tkeys"
  {ns}:c:<cache key>           hash: p (the answer, msgpack), s (stored at), e (expires at), x (stale until);
                               expires at x
  {ns}:l:<cache key>           coalescing lease: "token|expires at|followed" (callers' time; followed: 1 once a
                               follower waits, and only then are landings announced)
  {ns}:state                   hash: v (version), doc (sidecard.control.backend.State as JSON), by (instance), seeded
  {ns}:instances, {ns}:hb:<i>  zset instance -> heartbeat lapse time; the heartbeat (JSON), expiring
  {ns}:q:<bucket start>        hash "prompt\\tversion\\tmodel\\tcounter" -> count (s, n, a, f:<check>)
  {ns}:d:<name>                a decision's last record, "instance|unix time", replaced by compare-and-set
                               (a canary's rollback: once per release), expiring
  {ns}:cf                      hash "feature\tprompt" ("" any) -> unix time of its last `cache flush` (flushes)
  channels {ns}:state (a new version), {ns}:cache (a cache key whose leader landed or gave up, when followed),
           {ns}:flush (a cache flush: a field of {ns}:cf)

Scripts (sidecard/fleet/lua; each starts with prelude.lua: helpers and the schema check). Each reads and
checks everything it will touch before it writes, so garbage aborts it with no partial effect. Time is always
an argument (the caller's wall clock), never the server's: sidecars share one time base and tests are exact.
  request    the request path's one round trip: reap a few lapsed reservations; the shared cache (a fresh
             answer returns here, taking nothing, as the local cache does); the rate limits (GCRA as
             policies/bucket.py: the worst wait refuses and nothing is taken, else every bucket is taken
             from); the budgets (spent + reserved + this request's worst case against each hard limit; a
             refusal names the key that lets it through last and when, as limits/spend.py; else the worst case
             is reserved on every key); the coalescing lease (leader, or follower with the lease's time left)
  settle     the reservation released and the real cost recorded (a soft limit crossing is reported by exactly
             the one settle that crosses it, fleet-wide); token buckets corrected from estimate to real count
  cache_put  the leader's answer stored (byte limit per entry), its lease released, followers told
  lease      the leader renews its lease while its call runs, or gives it up (followers told at once)
  state      compare-and-set of the operator state (or a seed after the store lost it), announced
  decide     compare-and-set of a decision's record

Budget bound. At every admission, spent + reserved + estimate <= hard for each key, atomically across the
fleet, and a settle replaces its reservation by its cost. So the spend of a window stays within its hard limit
as long as each request costs at most its estimate (the engine's estimate is a worst case: the input estimate
and max_tokens at the dearest target's price). Beyond that the overshoot is at most:
  - the sum over admitted requests of (cost - estimate) where the estimate fell short;
  - the estimates of reservations that lapsed before their settle (their sidecar died, or a request outlived
    its deadline plus `reservation_margin_s`); a dead sidecar settles nothing, so this is usually zero spend;
  - while the store is unreachable, what each sidecar in `local_share` mode spends on its own share
    (hard / expected_instances each: with every sidecar cut off, up to one more hard limit in total); `closed`
    scopes add nothing.
Measured (tests/fleet/test_overshoot.py, bench/fleet_store.py): two sidecars, 32 requests in flight each,
$0.03 each against $1: $0.99 spent with reservations; $1.92 with check-then-spend.

Failure semantics. Every request-path operation has a deadline (`op_timeout_ms`, default 5 ms) and the
connection's breaker (3 timeouts in a row or half the calls failing: refused at once for `cooldown_s`, then one
probe); a request is never slowed by more than the deadline because of the store, and a store error
(`StoreUnavailable`, `StoreTimeout`, `StoreDataError`) means: decide locally, as without fleet mode. While
down: `FleetHealth.up` is False (reported once per outage), limits and budgets fall back per scope
(`local_share` or `closed`), the cache is the local level only, operator state is the last copy seen (the
local state file at start). An admission answered after its deadline is undone when its reply arrives.
Back up: reconnect (scripts reloaded), `on_up` (the daemon resyncs operator state), a store that came back
empty is given the newest last-known operator state by whichever sidecar resyncs first. Retry budgets stay
local: each sidecar caps its own amplification, so the fleet's is capped by the same factor.
"""
