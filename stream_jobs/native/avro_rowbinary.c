/*
 * The sink's bulk container (stream_jobs/bulk.py) transcoded from Avro to ClickHouse RowBinary.
 *
 * Input: an Avro Object Container File as BulkBlock.payload() builds it -- a header of
 * `head_len` bytes, then one block per message: count 1 (zigzag varint), byte length (zigzag
 * varint), the record, the 16-byte sync marker. A record is read with `program`, one opcode per
 * field of the container's writer schema (in order):
 *
 *   's' string or bytes -> String            'l' long -> Int64 (8 bytes LE)
 *   'u' string -> String, valid UTF-8 only (RFC 3629, as Python's decode: no overlong forms, no
 *       surrogates, nothing past U+10FFFF; anything else fails the call with E_UTF8)
 *   'i' int -> Int32 (range checked)         'z' boolean -> Bool (the byte must be 0 or 1)
 *   'd' double -> Float64 (8 raw bytes)      'f' float -> Float32 (4 raw bytes)
 *   'n' X: union [null, X] -> Nullable(X)    'a' X: array of X -> Array(X)   (X one of s l i z d f)
 *   'k' N: fixed(N), dropped                 'x' N: fixed(N) -> FixedString(N)   (N one byte, 1..255)
 *
 * Output: RowBinary, one row per record, the fields in schema order ('k' fields left out).
 *
 * List groups (issue 16, sw_values_to_rowbinary_lists only): '[' ... ']' around consecutive fields makes
 * them a group. The group's RowBinary bytes are not written into the row; the row gets instead the
 * group's key, FixedString(16) = the first 16 bytes of SHA-256 over exactly those bytes (the same as
 * ClickHouse's substring(SHA256(formatRowNoNewline('RowBinary', cols...)), 1, 16)), and each distinct
 * group value of the call is written once, in first-seen order, to the group's side output as a
 * RowBinary row (key, then the group's bytes). Distinct values are found by their bytes (a fast hash,
 * then memcmp), so SHA-256 runs once per distinct value.
 *
 * Anything that is not exactly one well-formed record per block -- a count other than 1, a
 * varint longer than 10 bytes or out of range, a negative length, a length past the end of the
 * record, a union index other than 0/1, a boolean byte other than 0/1, a record that does not end
 * exactly where its block says, a wrong sync marker, a row count other than `rows` -- makes the
 * whole call fail (a negative return): the caller then hands the block to ClickHouse as Avro.
 *
 * Returns the bytes written into `out`, or:
 *   -1 malformed input (the offset of the failure in *err_at), -2 `out` too small, -3 bad program,
 *   -4 a 'u' string that is not valid UTF-8 (the caller then takes the path that checks it in SQL).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* SHA256_Init/Update/Final: the one-shot SHA256() of OpenSSL 3 fetches the algorithm on every call
 * (EVP_Q_digest), ~0.5 µs each; the low-level calls go straight to the SHA-NI block function. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#define E_MALFORMED -1
#define E_ROOM -2
#define E_PROGRAM -3
#define E_UTF8 -4

#define MAX_GROUPS 4
#define KEY_LEN 16

typedef struct {
    uint64_t h;   /* fast hash of the value's bytes (0: empty slot; a real 0 is stored as 1) */
    size_t off;   /* where the value's bytes are in the side output (after its key) */
    size_t len;
} slot_t;

typedef struct {
    uint8_t *out;  /* the group's side output */
    size_t cap;
    size_t len;
    slot_t *slots; /* open addressing, `mask` + 1 slots */
    size_t mask;
    size_t used;
} group_t;

typedef struct {
    group_t g[MAX_GROUPS];
    long count;    /* groups the program declares */
    long open;     /* the group being read (-1: none) */
    long next;     /* the next group's index in the record */
    uint8_t *start;
} groups_t;

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    uint8_t *o;
    uint8_t *oend;
    int err;
    groups_t *groups;
} cur_t;

static inline int read_long(cur_t *c, int64_t *v) {
    uint64_t u = 0;
    if (c->p < c->end && !(*c->p & 0x80)) { /* one byte: most lengths and union indexes */
        u = *c->p++;
        *v = (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
        return 1;
    }
    for (int shift = 0; shift < 64; shift += 7) {
        if (c->p >= c->end) {
            c->err = E_MALFORMED;
            return 0;
        }
        uint8_t b = *c->p++;
        if (shift == 63 && (b & 0x7e)) { /* the 10th byte may only hold the top bit */
            c->err = E_MALFORMED;
            return 0;
        }
        u |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
            return 1;
        }
    }
    c->err = E_MALFORMED;
    return 0;
}

static int room(cur_t *c, size_t n) {
    if ((size_t)(c->oend - c->o) < n) {
        c->err = E_ROOM;
        return 0;
    }
    return 1;
}

static int write_uleb(cur_t *c, uint64_t n) {
    if (!room(c, 10))
        return 0;
    while (n >= 0x80) {
        *c->o++ = (uint8_t)(n | 0x80);
        n >>= 7;
    }
    *c->o++ = (uint8_t)n;
    return 1;
}

static int write_le(cur_t *c, uint64_t v, int bytes) {
    if (!room(c, (size_t)bytes))
        return 0;
    for (int i = 0; i < bytes; i++)
        *c->o++ = (uint8_t)(v >> (8 * i));
    return 1;
}

static int copy_raw(cur_t *c, size_t n) {
    if ((size_t)(c->end - c->p) < n) {
        c->err = E_MALFORMED;
        return 0;
    }
    if (!room(c, n))
        return 0;
    memcpy(c->o, c->p, n);
    c->o += n;
    c->p += n;
    return 1;
}

/* Whether p[0..n) is valid UTF-8 (RFC 3629: shortest forms only, no surrogates, at most U+10FFFF). */
static int utf8_valid(const uint8_t *p, size_t n) {
    const uint8_t *end = p + n;
    while (p < end) {
        while (end - p >= 32) { /* 32 ASCII bytes at a time (most of the text) */
            uint64_t w[4];
            memcpy(w, p, 32);
            if ((w[0] | w[1] | w[2] | w[3]) & 0x8080808080808080ULL)
                break;
            p += 32;
        }
        if (p == end)
            break;
        if (end - p >= 8) { /* eight ASCII bytes at a time */
            uint64_t w;
            memcpy(&w, p, 8);
            if (!(w & 0x8080808080808080ULL)) {
                p += 8;
                continue;
            }
        }
        uint8_t b = *p;
        if (b < 0x80) {
            p++;
            continue;
        }
        size_t left = (size_t)(end - p);
        if (b >= 0xC2 && b <= 0xDF) {
            if (left < 2 || (p[1] & 0xC0) != 0x80)
                return 0;
            p += 2;
        } else if (b >= 0xE0 && b <= 0xEF) {
            uint8_t lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
            if (left < 3 || p[1] < lo || p[1] > hi || (p[2] & 0xC0) != 0x80)
                return 0;
            p += 3;
        } else if (b >= 0xF0 && b <= 0xF4) {
            uint8_t lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
            if (left < 4 || p[1] < lo || p[1] > hi || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
                return 0;
            p += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* One value of a scalar opcode. */
static int scalar(cur_t *c, uint8_t op) {
    int64_t v;
    switch (op) {
    case 's':
        if (!read_long(c, &v))
            return 0;
        if (v < 0 || v > c->end - c->p) {
            c->err = E_MALFORMED;
            return 0;
        }
        return write_uleb(c, (uint64_t)v) && copy_raw(c, (size_t)v);
    case 'u':
        if (!read_long(c, &v))
            return 0;
        if (v < 0 || v > c->end - c->p) {
            c->err = E_MALFORMED;
            return 0;
        }
        if (!utf8_valid(c->p, (size_t)v)) {
            c->err = E_UTF8;
            return 0;
        }
        return write_uleb(c, (uint64_t)v) && copy_raw(c, (size_t)v);
    case 'l':
        return read_long(c, &v) && write_le(c, (uint64_t)v, 8);
    case 'i':
        if (!read_long(c, &v))
            return 0;
        if (v < INT32_MIN || v > INT32_MAX) {
            c->err = E_MALFORMED;
            return 0;
        }
        return write_le(c, (uint64_t)(uint32_t)(int32_t)v, 4);
    case 'z':
        if (c->p >= c->end || *c->p > 1) {
            c->err = E_MALFORMED;
            return 0;
        }
        return copy_raw(c, 1);
    case 'd':
        return copy_raw(c, 8);
    case 'f':
        return copy_raw(c, 4);
    default:
        c->err = E_PROGRAM;
        return 0;
    }
}

/* Past one value of a scalar opcode, checked as scalar() checks it, nothing written. */
static int skip(cur_t *c, uint8_t op) {
    int64_t v;
    size_t n;
    switch (op) {
    case 's':
    case 'u': /* its text is checked when scalar() copies it */
        if (!read_long(c, &v))
            return 0;
        if (v < 0 || v > c->end - c->p) {
            c->err = E_MALFORMED;
            return 0;
        }
        c->p += v;
        return 1;
    case 'l':
        return read_long(c, &v);
    case 'i':
        if (!read_long(c, &v))
            return 0;
        if (v < INT32_MIN || v > INT32_MAX) {
            c->err = E_MALFORMED;
            return 0;
        }
        return 1;
    case 'z':
        if (c->p >= c->end || *c->p > 1) {
            c->err = E_MALFORMED;
            return 0;
        }
        c->p++;
        return 1;
    case 'd':
    case 'f':
        n = op == 'd' ? 8 : 4;
        if ((size_t)(c->end - c->p) < n) {
            c->err = E_MALFORMED;
            return 0;
        }
        c->p += n;
        return 1;
    default:
        c->err = E_PROGRAM;
        return 0;
    }
}

/* An Avro array (blocks of items, a negative count followed by the block's byte size, 0 ends it):
 * RowBinary wants the total count first, so the blocks are walked twice. */
static int array(cur_t *c, uint8_t item) {
    const uint8_t *start = c->p;
    uint64_t total = 0;
    int64_t count, size;
    for (;;) { /* first pass: count the items (and check the framing) */
        if (!read_long(c, &count))
            return 0;
        if (count == 0)
            break;
        if (count < 0) {
            if (count == INT64_MIN || !read_long(c, &size) || size < 0) {
                c->err = E_MALFORMED;
                return 0;
            }
            count = -count;
        }
        if ((uint64_t)count > (uint64_t)(c->end - c->p)) { /* every item takes at least one byte */
            c->err = E_MALFORMED;
            return 0;
        }
        total += (uint64_t)count;
        for (int64_t i = 0; i < count; i++)
            if (!skip(c, item))
                return 0;
    }
    const uint8_t *after = c->p;
    c->p = start;
    if (!write_uleb(c, total))
        return 0;
    for (;;) {
        read_long(c, &count); /* all checked above */
        if (count == 0)
            break;
        if (count < 0) {
            read_long(c, &size);
            count = -count;
        }
        for (int64_t i = 0; i < count; i++)
            if (!scalar(c, item))
                return 0;
    }
    if (c->p != after) {
        c->err = E_MALFORMED;
        return 0;
    }
    return 1;
}

static uint64_t fast_hash(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 29;
    return h ? h : 1;
}

/* The end of a group: its bytes [start, c->o) replaced in the row by their key; a new value appended
 * to the group's side output (key, bytes). */
static int group_end(cur_t *c) {
    groups_t *gs = c->groups;
    group_t *g = &gs->g[gs->open];
    uint8_t *start = gs->start;
    size_t n = (size_t)(c->o - start);
    if ((size_t)(c->oend - start) < KEY_LEN) { /* the key replaces the bytes: it needs 16 of room */
        c->err = E_ROOM;
        return 0;
    }
    uint64_t h = fast_hash(start, n);
    size_t i = (size_t)h & g->mask;
    while (g->slots[i].h) {
        slot_t *s = &g->slots[i];
        if (s->h == h && s->len == n && memcmp(g->out + s->off, start, n) == 0) {
            memcpy(start, g->out + s->off - KEY_LEN, KEY_LEN);
            c->o = start + KEY_LEN;
            gs->open = -1;
            return 1;
        }
        i = (i + 1) & g->mask;
    }
    if (g->cap - g->len < KEY_LEN + n || g->used * 2 >= g->mask) {
        c->err = E_ROOM;
        return 0;
    }
    uint8_t digest[SHA256_DIGEST_LENGTH];
    SHA256_CTX sha;
    SHA256_Init(&sha);
    SHA256_Update(&sha, start, n);
    SHA256_Final(digest, &sha);
    memcpy(g->out + g->len, digest, KEY_LEN);
    memcpy(g->out + g->len + KEY_LEN, start, n);
    g->slots[i].h = h;
    g->slots[i].off = g->len + KEY_LEN;
    g->slots[i].len = n;
    g->len += KEY_LEN + n;
    g->used++;
    memcpy(start, digest, KEY_LEN);
    c->o = start + KEY_LEN;
    gs->open = -1;
    return 1;
}

static int record(cur_t *c, const uint8_t *prog, size_t prog_len) {
    if (c->groups)
        c->groups->next = 0;
    for (size_t k = 0; k < prog_len; k++) {
        uint8_t op = prog[k];
        int64_t v;
        switch (op) {
        case '[':
            if (!c->groups || c->groups->open >= 0 || c->groups->next >= c->groups->count) {
                c->err = E_PROGRAM;
                return 0;
            }
            c->groups->open = c->groups->next++;
            c->groups->start = c->o;
            break;
        case ']':
            if (!c->groups || c->groups->open < 0 || c->o == c->groups->start) {
                c->err = E_PROGRAM;
                return 0;
            }
            if (!group_end(c))
                return 0;
            break;
        case 'n':
            if (++k >= prog_len) {
                c->err = E_PROGRAM;
                return 0;
            }
            if (!read_long(c, &v))
                return 0;
            if (v == 0) {
                if (!write_le(c, 1, 1))
                    return 0;
            } else if (v == 1) {
                if (!write_le(c, 0, 1))
                    return 0;
                if (prog[k] == 'a') {
                    if (++k >= prog_len || !array(c, prog[k]))
                        return 0;
                } else if (!scalar(c, prog[k])) {
                    return 0;
                }
            } else {
                c->err = E_MALFORMED;
                return 0;
            }
            break;
        case 'a':
            if (++k >= prog_len) {
                c->err = E_PROGRAM;
                return 0;
            }
            if (!array(c, prog[k]))
                return 0;
            break;
        case 'k':
        case 'x':
            if (++k >= prog_len || prog[k] == 0) {
                c->err = E_PROGRAM;
                return 0;
            }
            if ((size_t)(c->end - c->p) < prog[k]) {
                c->err = E_MALFORMED;
                return 0;
            }
            if (op == 'k')
                c->p += prog[k];
            else if (!copy_raw(c, prog[k]))
                return 0;
            break;
        default:
            if (!scalar(c, op))
                return 0;
        }
    }
    if (c->groups && (c->groups->open >= 0 || c->groups->next != c->groups->count)) {
        c->err = E_PROGRAM;
        return 0;
    }
    return 1;
}

/* The interface's version: 2 = every string is checked as UTF-8 here (the SQL check is dropped on
 * the strength of it); 3 = sw_values_to_rowbinary. The loader refuses a library that reports another
 * version. 4 = sw_values_to_rowbinary_lists (list groups, '[' ']'). */
long sw_avro_rowbinary_abi(void) { return 4; }

long sw_avro_to_rowbinary(const uint8_t *payload, size_t len, size_t head_len, const uint8_t *sync,
                          const uint8_t *prog, size_t prog_len, long rows, uint8_t *out, size_t out_cap,
                          long *err_at) {
    cur_t c = {payload + head_len, payload + len, out, out + out_cap, 0, NULL};
    long seen = 0;
    *err_at = -1;
    if (head_len > len)
        return E_MALFORMED;
    while (c.p < c.end) {
        int64_t count, size;
        if (!read_long(&c, &count) || count != 1 || !read_long(&c, &size) || size < 0 ||
            size > c.end - c.p) {
            c.err = c.err ? c.err : E_MALFORMED;
            break;
        }
        const uint8_t *block_end = c.p + size;
        const uint8_t *end = c.end;
        c.end = block_end; /* a record never reads past its block */
        int ok = record(&c, prog, prog_len);
        c.end = end;
        if (!ok)
            break;
        if (c.p != block_end || (size_t)(c.end - c.p) < 16 || memcmp(c.p, sync, 16) != 0) {
            c.err = E_MALFORMED;
            break;
        }
        c.p += 16;
        seen++;
    }
    if (!c.err && seen != rows)
        c.err = E_MALFORMED;
    if (c.err) {
        *err_at = (long)(c.p - payload);
        return c.err;
    }
    return (long)(c.o - out);
}

/*
 * The same rows straight from the Kafka message values, no container (issue 16): `data` holds the
 * `rows` values one after the other, value i ending at ends[i] (non-decreasing, the last one `len`).
 * Each value is read with `prog` but its last opcode, which must be 'x' 24 (the container's `_prov`):
 * the value must end exactly where that record ends, and the row's FixedString(24) is written here
 * from the value's run -- the 16-byte prefix (nonce, topic index, partition) of run r covers rows
 * run_starts[r] up to the next run's start (run_starts[0] is 0, strictly increasing, each < rows) --
 * and offsets[i] (8 bytes LE). The output is byte for byte what sw_avro_to_rowbinary writes for the
 * container of the same messages. Errors as there; *err_at is then the failing row.
 */
static long values_to_rowbinary(const uint8_t *data, size_t len, const int64_t *ends, const int64_t *offsets, long rows,
                                const int64_t *run_starts, const uint8_t *prefixes, long runs, const uint8_t *prog,
                                size_t prog_len, uint8_t *out, size_t out_cap, long *err_at, groups_t *groups) {
    cur_t c = {data, data, out, out + out_cap, 0, groups};
    *err_at = -1;
    if (prog_len < 2 || prog[prog_len - 2] != 'x' || prog[prog_len - 1] != 24)
        return E_PROGRAM;
    if (rows < 0 || runs < 1 || (rows > 0 && run_starts[0] != 0) || (rows == 0 && len != 0))
        return E_MALFORMED;
    for (long r = 1; r < runs; r++)
        if (run_starts[r] <= run_starts[r - 1] || run_starts[r] >= rows)
            return E_MALFORMED;
    long run = 0;
    const uint8_t *prefix = prefixes;
    size_t start = 0;
    for (long i = 0; i < rows; i++) {
        if (run + 1 < runs && i == run_starts[run + 1]) {
            run++;
            prefix = prefixes + 16 * (size_t)run;
        }
        if (ends[i] < (int64_t)start || (uint64_t)ends[i] > len) {
            c.err = E_MALFORMED;
            *err_at = i;
            return c.err;
        }
        c.p = data + start;
        c.end = data + ends[i];
        if (!record(&c, prog, prog_len - 2) || c.p != c.end || !room(&c, 24)) {
            c.err = c.err ? c.err : E_MALFORMED;
            *err_at = i;
            return c.err;
        }
        memcpy(c.o, prefix, 16);
        c.o += 16;
        write_le(&c, (uint64_t)offsets[i], 8);
        start = (size_t)ends[i];
    }
    if (start != len) {
        *err_at = rows;
        return E_MALFORMED;
    }
    return (long)(c.o - out);
}

long sw_values_to_rowbinary(const uint8_t *data, size_t len, const int64_t *ends, const int64_t *offsets, long rows,
                            const int64_t *run_starts, const uint8_t *prefixes, long runs, const uint8_t *prog,
                            size_t prog_len, uint8_t *out, size_t out_cap, long *err_at) {
    return values_to_rowbinary(data, len, ends, offsets, rows, run_starts, prefixes, runs, prog, prog_len, out,
                               out_cap, err_at, NULL);
}

/*
 * sw_values_to_rowbinary with list groups ('[' ']' in `prog`, `groups` of them, at most MAX_GROUPS): group
 * j's distinct values go to side + j * side_cap, side_lens[j] their bytes. E_ROOM when `out` or a side
 * output is too small (the caller retries with more), E_PROGRAM when the program's groups do not match.
 */
long sw_values_to_rowbinary_lists(const uint8_t *data, size_t len, const int64_t *ends, const int64_t *offsets,
                                  long rows, const int64_t *run_starts, const uint8_t *prefixes, long runs,
                                  const uint8_t *prog, size_t prog_len, uint8_t *out, size_t out_cap, long *err_at,
                                  long groups, uint8_t *side, size_t side_cap, long *side_lens) {
    groups_t gs;
    memset(&gs, 0, sizeof gs);
    *err_at = -1;
    if (groups < 1 || groups > MAX_GROUPS || rows < 0)
        return E_PROGRAM;
    size_t slots = 16;
    while (slots < 2 * (size_t)rows + 16)
        slots <<= 1;
    gs.count = groups;
    gs.open = -1;
    long result = E_ROOM;
    for (long j = 0; j < groups; j++) {
        gs.g[j].out = side + (size_t)j * side_cap;
        gs.g[j].cap = side_cap;
        gs.g[j].mask = slots - 1;
        gs.g[j].slots = calloc(slots, sizeof(slot_t));
        if (!gs.g[j].slots)
            goto done;
    }
    result = values_to_rowbinary(data, len, ends, offsets, rows, run_starts, prefixes, runs, prog, prog_len, out,
                                 out_cap, err_at, &gs);
    for (long j = 0; j < groups; j++)
        side_lens[j] = (long)gs.g[j].len;
done:
    for (long j = 0; j < groups; j++)
        free(gs.g[j].slots);
    return result;
}
