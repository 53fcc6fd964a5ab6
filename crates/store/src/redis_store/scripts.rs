//! The Lua scripts: each one user's keys (one cluster slot) changed atomically; the sources
//! of those also run as a plain `EVAL` before `WAIT` are constants of their own.

use std::sync::LazyLock;

use redis::Script;

/// Deposit: KEYS = mail order, mail data, sequence, block list, byte count; ARGV = mail key,
/// sender, value, cap, GC expiry ms, byte cap. Returns 1 stored, 0 duplicate, -1 blocked,
/// -2 full (messages), -3 full (bytes).
pub(super) static DEPOSIT: LazyLock<Script> = LazyLock::new(|| Script::new(DEPOSIT_SOURCE));

/// The source of [`DEPOSIT`], also sent as a plain `EVAL` when the deposit must reach a
/// replica (see [`RedisStore::invoke_replicated`]).
pub(super) const DEPOSIT_SOURCE: &str = r"
        if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then return -1 end
        if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
        if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -2 end
        local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
        if bytes + #ARGV[3] > tonumber(ARGV[6]) then return -3 end
        local sequence = redis.call('INCR', KEYS[3])
        redis.call('ZADD', KEYS[1], sequence, ARGV[1])
        redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
        redis.call('INCRBY', KEYS[5], #ARGV[3])
        redis.call('PEXPIRE', KEYS[1], ARGV[5])
        redis.call('PEXPIRE', KEYS[2], ARGV[5])
        redis.call('PEXPIRE', KEYS[3], ARGV[5])
        redis.call('PEXPIRE', KEYS[5], ARGV[5])
        return 1
        ";

/// What [`DEPOSIT`] answers when the mailbox is at its message cap.
pub(super) const DEPOSIT_FULL: i64 = -2;
/// What [`DEPOSIT`] answers when the message would pass the mailbox's byte cap.
pub(super) const DEPOSIT_FULL_BYTES: i64 = -3;

/// Removal: KEYS = mail order, mail data, byte count, quarantine; ARGV = GC expiry ms, then
/// triples (action, mail key, new key): `d` deletes the entry, `q` moves its value to
/// quarantine, `m` moves an old-layout entry to its new key at the same sequence (or drops
/// it when the new key exists). Deleted and quarantined values give their bytes back (the
/// count never goes below zero, and is reset when the mailbox empties). Returns how many
/// entries had a value to delete.
pub(super) static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local removed = 0
        local freed = 0
        for index = 2, #ARGV, 3 do
            local action, key, target = ARGV[index], ARGV[index + 1], ARGV[index + 2]
            local value = redis.call('HGET', KEYS[2], key)
            if action == 'm' then
                local score = redis.call('ZSCORE', KEYS[1], key)
                if value and score then
                    redis.call('ZREM', KEYS[1], key)
                    redis.call('HDEL', KEYS[2], key)
                    if redis.call('HEXISTS', KEYS[2], target) == 0 then
                        redis.call('ZADD', KEYS[1], score, target)
                        redis.call('HSET', KEYS[2], target, value)
                    end
                end
            else
                redis.call('ZREM', KEYS[1], key)
                if value then
                    redis.call('HDEL', KEYS[2], key)
                    removed = removed + 1
                    freed = freed + #value
                    if action == 'q' then
                        redis.call('HSET', KEYS[4], key, value)
                        redis.call('PEXPIRE', KEYS[4], ARGV[1])
                    end
                end
            end
        end
        if redis.call('ZCARD', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[3])
        elseif freed > 0 and redis.call('DECRBY', KEYS[3], freed) < 0 then
            redis.call('DEL', KEYS[3])
        end
        return removed
        ",
    )
});

/// Fetch: KEYS = mail order, mail data; ARGV = first and last rank, byte budget, stored
/// overhead. Returns the mailbox size, the ids from the first rank on, and their values
/// (nil where missing): all of the range, or fewer once the values' sizes, each less the
/// overhead, pass the budget (the value passing it included, so at least one comes back).
/// Less the overhead, a value never counts more than its envelope does in [`Batch`], so
/// the script reads at least what the batch takes, and [`Batch`] trims the rest exactly.
/// `HMGET` goes in chunks growing from 8 to 512 (Lua's `unpack` has a stack limit), so a
/// batch of a few large values reads few, and one of many small values takes few calls.
pub(super) static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local total = redis.call('ZCARD', KEYS[1])
        local ids = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])
        local budget = tonumber(ARGV[3])
        local overhead = tonumber(ARGV[4])
        local values = {}
        local used = 0
        local chunk = 8
        while #values < #ids and used <= budget do
            local first = #values + 1
            local last = math.min(first + chunk - 1, #ids)
            local got = redis.call('HMGET', KEYS[2], unpack(ids, first, last))
            for index = 1, #got do
                local value = got[index]
                values[#values + 1] = value
                if value then used = used + math.max(#value - overhead, 0) end
                if used > budget then break end
            end
            chunk = math.min(chunk * 2, 512)
        end
        for index = #ids, #values + 1, -1 do ids[index] = nil end
        return {total, ids, values}
        ",
    )
});

/// Bind: KEYS = binding; ARGV = value. Returns the existing value, or nil after binding.
pub(super) static BIND: LazyLock<Script> = LazyLock::new(|| Script::new(BIND_SOURCE));

/// The source of [`BIND`].
pub(super) const BIND_SOURCE: &str = r"
        local existing = redis.call('GET', KEYS[1])
        if existing then return existing end
        redis.call('SET', KEYS[1], ARGV[1])
        return false
        ";

/// Publish prekeys: KEYS = the user's prekey owner hash, their one-time key list; ARGV =
/// owner record, Olm key, the most one-time keys kept, `1` when the publish carries no
/// fallback key (the stored record, with its fallback key, is then kept for the same Olm
/// key), then each new one-time key. A new Olm key drops the old key's one-time keys; a key
/// already listed is not added again; beyond the most kept, the oldest go. Returns how many
/// are listed.
pub(super) static PUBLISH_PREKEYS: LazyLock<Script> =
    LazyLock::new(|| Script::new(PUBLISH_PREKEYS_SOURCE));

/// The source of [`PUBLISH_PREKEYS`].
pub(super) const PUBLISH_PREKEYS_SOURCE: &str = r"
        local old = redis.call('HGET', KEYS[1], 'olm')
        if old and old ~= ARGV[2] then redis.call('DEL', KEYS[2]) end
        if not (ARGV[4] == '1' and old == ARGV[2]) then
            redis.call('HSET', KEYS[1], 'record', ARGV[1], 'olm', ARGV[2])
        end
        for index = 5, #ARGV do
            if not redis.call('LPOS', KEYS[2], ARGV[index]) then
                redis.call('RPUSH', KEYS[2], ARGV[index])
            end
        end
        local count = redis.call('LLEN', KEYS[2])
        local most = tonumber(ARGV[3])
        if count > most then
            redis.call('LTRIM', KEYS[2], count - most, -1)
            count = most
        end
        return count
        ";

/// Claim a prekey: KEYS = the user's prekey owner hash, their one-time key list. Returns
/// nil when the user published nothing, else the owner record and, when one was left, the
/// oldest one-time key, popped in the same step.
pub(super) static CLAIM_PREKEY: LazyLock<Script> =
    LazyLock::new(|| Script::new(CLAIM_PREKEY_SOURCE));

/// The source of [`CLAIM_PREKEY`].
pub(super) const CLAIM_PREKEY_SOURCE: &str = r"
        local record = redis.call('HGET', KEYS[1], 'record')
        if not record then return false end
        local key = redis.call('LPOP', KEYS[2])
        if key then return {record, key} end
        return {record}
        ";

/// Rotate: KEYS = binding, rotations, prekey owner, one-time keys (the published keys go:
/// the old identity signed them); ARGV = expected binding, new binding, statement, how
/// many statements to keep. Compare and set: returns `{0, ''}` after rotating, or
/// `{1, standing binding or ''}` when the binding is not the expected one.
pub(super) static ROTATE: LazyLock<Script> = LazyLock::new(|| Script::new(ROTATE_SOURCE));

/// The source of [`ROTATE`].
pub(super) const ROTATE_SOURCE: &str = r"
        local standing = redis.call('GET', KEYS[1])
        if standing ~= ARGV[1] then return {1, standing or ''} end
        redis.call('SET', KEYS[1], ARGV[2])
        redis.call('RPUSH', KEYS[2], ARGV[3])
        redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
        redis.call('DEL', KEYS[3], KEYS[4])
        return {0, ''}
        ";

/// Release: KEYS = binding, rotations, prekey owner, one-time keys. Deletes them all;
/// returns the binding there was.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SOURCE));

/// The source of [`RELEASE`].
pub(super) const RELEASE_SOURCE: &str = r"
        local standing = redis.call('GET', KEYS[1])
        redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
        return standing
        ";

/// Presence on a cluster: KEYS = presence, routes; ARGV = session, value, keep ms,
/// instance, presence expiry ms, prune-before ms. Writes the presence as the single-server
/// pipeline does, names this instance as a route to the user (valued by the presence's
/// expiry), and drops routes that lapsed before the prune time (an instance that died
/// without clearing its route).
pub(super) static SET_PRESENCE_ROUTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        redis.call('HSET', KEYS[1], 'session', ARGV[1], 'value', ARGV[2])
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
        if redis.call('HLEN', KEYS[2]) > 1 then
            local routes = redis.call('HGETALL', KEYS[2])
            local prune_before = tonumber(ARGV[6])
            for index = 1, #routes, 2 do
                if tonumber(routes[index + 1]) < prune_before then
                    redis.call('HDEL', KEYS[2], routes[index])
                end
            end
        end
        redis.call('PEXPIRE', KEYS[2], ARGV[3])
        return 1
        ",
    )
});

/// Clear presence: KEYS = presence; ARGV = session, cleared value. Returns 1 if the
/// session still owned the presence (and it is now cleared), else 0.
pub(super) static CLEAR_PRESENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('HGET', KEYS[1], 'session') ~= ARGV[1] then return 0 end
        redis.call('HSET', KEYS[1], 'value', ARGV[2])
        return 1
        ",
    )
});

/// Leave the online index: KEYS = the user's online index bucket; ARGV = user, the expiry
/// the cleared presence had.
/// Removes the entry only if its expiry is not later (the index writer may not have sent
/// the leaving session's last move yet), so a newer session's entry (written meanwhile,
/// with a later expiry) stays.
pub(super) static LEAVE_ONLINE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
        if score and tonumber(score) <= tonumber(ARGV[2]) then
            return redis.call('ZREM', KEYS[1], ARGV[1])
        end
        return 0
        ",
    )
});
