/* The stdio keeper process: holds the read end of every supervised program's stdout/stderr pipe.
 *
 * Run as `grenadine-keep FD [IDLE_SECONDS]` where FD is a listening unix socket
 * (SOCK_SEQPACKET).
 * It never reads the pipes: while a supervisor runs, the supervisor drains them through its
 * own copy of each read end; when the supervisor is killed, this process keeps the pipes open,
 * so a program's writes neither fail (EPIPE) nor kill it (SIGPIPE): its output waits in the
 * pipe until the next supervisor takes the read ends back from here and drains them into the
 * log files.
 *
 * One request per message (a JSON object), one reply per request; fds travel with SCM_RIGHTS:
 *   {"op": "keep", "key": K} + fd   hold a copy of fd under K
 *   {"op": "keep", "keys": [K, ...]} + one fd per key, in order: hold each (all or, out of
 *                                   memory, none); "keys" wins over "key"
 *   {"op": "take", "key": K}        reply carries a copy of the fd held under K
 *   {"op": "drop", "key": K}        close and forget K
 *   {"op": "list"}                  {"keys": [...]}, sorted
 *   {"op": "quit"}                  close everything and exit
 * Replies are {"ok": true}, {"ok": true, "keys": [...]} or {"ok": false, "error": "bad
 * request: ..."}. Only a peer of this process's uid is served; a single supervisor talks to it
 * at a time (the state_dir lock ensures there is only one).
 *
 * It exits on its own once no supervisor has been connected for IDLE_SECONDS while every pipe
 * it holds is hung up (no program can write to it any more): a supervisor killed for good,
 * whose programs are gone too, leaves nothing for it to keep.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "json_text.h"

#define MAX_MESSAGE 65536
#define PROCESS_NAME "grenadine-keep"
#define DEFAULT_IDLE_SECONDS 600.0
/* Once idle that long, how often it looks again whether a program still holds a pipe. */
#define RECHECK_SECONDS 5.0
/* The kernel's own limit on fds in one message (SCM_MAX_FD). */
#define MAX_FDS_PER_MESSAGE 253
#define MAX_NESTING 256

struct entry {
    int fd;
    size_t length;
    char key[];
};

/* The fds held, sorted by key (byte order), so that a lookup is a binary search and `list`
 * needs no sort. */
struct table {
    struct entry **entries;
    size_t count, capacity;
};

struct slice {
    const char *data;
    size_t length;
};

struct fds {
    int fd[MAX_FDS_PER_MESSAGE];
    size_t count;
};

/* A JSON text being read; strings are decoded in place (never longer than their source). */
struct parser {
    char *at, *start, *end;
    const char *error;
    int depth;
};

struct request {
    bool op_is_string, key_is_string, keys_is_list;
    struct slice op, key;
    /* "keys", when a list of strings: its first MAX_FDS_PER_MESSAGE, and how many it has. */
    struct slice keys[MAX_FDS_PER_MESSAGE];
    size_t key_count;
};

struct output {
    char *data;
    size_t length, capacity;
    bool failed;
};

/* ---- the held fds ---- */

static int compare_key(const struct entry *entry, struct slice key)
{
    size_t common = entry->length < key.length ? entry->length : key.length;
    int order = memcmp(entry->key, key.data, common);
    if (order != 0)
        return order;
    return (entry->length > key.length) - (entry->length < key.length);
}

/* The position of `key` in the table, or where it would go; *found says which. */
static size_t table_find(const struct table *table, struct slice key, bool *found)
{
    size_t low = 0, high = table->count;
    while (low < high) {
        size_t middle = low + (high - low) / 2;
        int order = compare_key(table->entries[middle], key);
        if (order == 0) {
            *found = true;
            return middle;
        }
        if (order < 0)
            low = middle + 1;
        else
            high = middle;
    }
    *found = false;
    return low;
}

/* Room for `more` entries besides those held. */
static bool table_reserve(struct table *table, size_t more)
{
    if (table->capacity - table->count >= more)
        return true;
    size_t capacity = table->capacity ? table->capacity : 64;
    while (capacity - table->count < more)
        capacity *= 2;
    struct entry **entries = realloc(table->entries, capacity * sizeof *entries);
    if (entries == NULL)
        return false;
    table->entries = entries;
    table->capacity = capacity;
    return true;
}

static struct entry *new_entry(struct slice key)
{
    struct entry *entry = malloc(sizeof *entry + key.length);
    if (entry != NULL) {
        entry->length = key.length;
        memcpy(entry->key, key.data, key.length);
    }
    return entry;
}

/* Hold `fd` under the key of `entry` (the table has room for it), closing what was held under
 * that key before. */
static void table_insert(struct table *table, struct entry *entry, int fd)
{
    bool found;
    size_t at = table_find(table, (struct slice){entry->key, entry->length}, &found);
    if (found) {
        free(entry);
        close(table->entries[at]->fd);
        table->entries[at]->fd = fd;
        return;
    }
    entry->fd = fd;
    memmove(&table->entries[at + 1], &table->entries[at],
            (table->count - at) * sizeof *table->entries);
    table->entries[at] = entry;
    table->count++;
}

/* Hold each of `fds` under the key at the same place in `keys`, and take them out of `fds`:
 * all of them, or none when out of memory (false). */
static bool table_keep_all(struct table *table, const struct slice *keys, struct fds *fds)
{
    struct entry *fresh[MAX_FDS_PER_MESSAGE];
    if (!table_reserve(table, fds->count))
        return false;
    for (size_t i = 0; i < fds->count; i++) {
        fresh[i] = new_entry(keys[i]);
        if (fresh[i] == NULL) {
            while (i > 0)
                free(fresh[--i]);
            return false;
        }
    }
    for (size_t i = 0; i < fds->count; i++)
        table_insert(table, fresh[i], fds->fd[i]);
    fds->count = 0;
    return true;
}

static void table_drop(struct table *table, struct slice key)
{
    bool found;
    size_t at = table_find(table, key, &found);
    if (!found)
        return;
    close(table->entries[at]->fd);
    free(table->entries[at]);
    table->count--;
    memmove(&table->entries[at], &table->entries[at + 1],
            (table->count - at) * sizeof *table->entries);
}

static void table_clear(struct table *table)
{
    for (size_t i = 0; i < table->count; i++) {
        close(table->entries[i]->fd);
        free(table->entries[i]);
    }
    free(table->entries);
    *table = (struct table){0};
}

/* True when no process holds the write end of any pipe held (also when none is held). */
static bool all_hung_up(const struct table *table)
{
    if (table->count == 0)
        return true;
    struct pollfd *polled = calloc(table->count, sizeof *polled);
    if (polled == NULL)
        return false;
    for (size_t i = 0; i < table->count; i++)
        polled[i] = (struct pollfd){.fd = table->entries[i]->fd, .events = POLLIN};
    int ready;
    do
        ready = poll(polled, table->count, 0);
    while (ready < 0 && errno == EINTR);
    bool hung_up = ready >= 0;
    for (size_t i = 0; hung_up && i < table->count; i++)
        hung_up = (polled[i].revents & (POLLHUP | POLLERR)) != 0;
    free(polled);
    return hung_up;
}

/* ---- reading a request ---- */

static bool fail(struct parser *parser, const char *error)
{
    if (parser->error == NULL)
        parser->error = error;
    return false;
}

static void skip_space(struct parser *parser)
{
    while (parser->at < parser->end
           && (*parser->at == ' ' || *parser->at == '\t' || *parser->at == '\n'
               || *parser->at == '\r'))
        parser->at++;
}

static bool next_is(struct parser *parser, char wanted)
{
    skip_space(parser);
    return parser->at < parser->end && *parser->at == wanted;
}

/* Step over `wanted` if it comes next (after whitespace). */
static bool consume(struct parser *parser, char wanted)
{
    if (!next_is(parser, wanted))
        return false;
    parser->at++;
    return true;
}

static bool expect(struct parser *parser, char wanted, const char *error)
{
    return consume(parser, wanted) || fail(parser, error);
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The code unit of a \uXXXX whose `u` the parser is at, or -1. */
static long read_hex4(struct parser *parser)
{
    if (parser->end - parser->at < 5 || parser->at[0] != 'u')
        return -1;
    long unit = 0;
    for (int i = 1; i <= 4; i++) {
        int digit = hex_digit(parser->at[i]);
        if (digit < 0)
            return -1;
        unit = unit * 16 + digit;
    }
    parser->at += 5;
    return unit;
}

static char *put_utf8(char *out, uint32_t code)
{
    if (code < 0x80) {
        *out++ = (char)code;
    } else if (code < 0x800) {
        *out++ = (char)(0xC0 | code >> 6);
        *out++ = (char)(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
        *out++ = (char)(0xE0 | code >> 12);
        *out++ = (char)(0x80 | (code >> 6 & 0x3F));
        *out++ = (char)(0x80 | (code & 0x3F));
    } else {
        *out++ = (char)(0xF0 | code >> 18);
        *out++ = (char)(0x80 | (code >> 12 & 0x3F));
        *out++ = (char)(0x80 | (code >> 6 & 0x3F));
        *out++ = (char)(0x80 | (code & 0x3F));
    }
    return out;
}

/* A \uXXXX escape (a surrogate pair takes two), the parser past the backslash. */
static bool decode_unicode_escape(struct parser *parser, char **out)
{
    long unit = read_hex4(parser);
    if (unit < 0)
        return fail(parser, "bad \\u escape");
    if (unit >= 0xDC00 && unit <= 0xDFFF)
        return fail(parser, "lone surrogate");
    if (unit >= 0xD800 && unit <= 0xDBFF) {
        if (parser->end - parser->at < 1 || *parser->at != '\\')
            return fail(parser, "lone surrogate");
        parser->at++;
        long low = read_hex4(parser);
        if (low < 0xDC00 || low > 0xDFFF)
            return fail(parser, "lone surrogate");
        unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
    }
    *out = put_utf8(*out, (uint32_t)unit);
    return true;
}

static bool decode_escape(struct parser *parser, char **out)
{
    static const char plain[] = "\"\\/bfnrt", meaning[] = "\"\\/\b\f\n\r\t";
    if (parser->at == parser->end)
        return fail(parser, "unterminated string");
    if (*parser->at == 'u')
        return decode_unicode_escape(parser, out);
    const char *found = *parser->at ? strchr(plain, *parser->at) : NULL;
    if (found == NULL)
        return fail(parser, "bad escape");
    *(*out)++ = meaning[found - plain];
    parser->at++;
    return true;
}

static bool copy_raw(struct parser *parser, char **out)
{
    if ((unsigned char)*parser->at < 0x20)
        return fail(parser, "control character in string");
    uint32_t code;
    size_t length = utf8_sequence((const unsigned char *)parser->at,
                                  (size_t)(parser->end - parser->at), &code);
    if (length == 0)
        return fail(parser, "invalid UTF-8");
    memmove(*out, parser->at, length);
    *out += length;
    parser->at += length;
    return true;
}

static bool parse_string(struct parser *parser, struct slice *decoded)
{
    if (!expect(parser, '"', "expected a string"))
        return false;
    char *out = parser->at;
    decoded->data = out;
    while (parser->at < parser->end && *parser->at != '"') {
        bool ok = *parser->at == '\\' ? (parser->at++, decode_escape(parser, &out))
                                      : copy_raw(parser, &out);
        if (!ok)
            return false;
    }
    if (parser->at == parser->end)
        return fail(parser, "unterminated string");
    parser->at++;
    decoded->length = (size_t)(out - decoded->data);
    return true;
}

static bool skip_digits(struct parser *parser)
{
    const char *first = parser->at;
    while (parser->at < parser->end && *parser->at >= '0' && *parser->at <= '9')
        parser->at++;
    return parser->at > first;
}

static bool parse_number(struct parser *parser)
{
    if (parser->at < parser->end && *parser->at == '-')
        parser->at++;
    if (parser->at < parser->end && *parser->at == '0')
        parser->at++;
    else if (!skip_digits(parser))
        return fail(parser, "bad number");
    if (parser->at < parser->end && *parser->at == '.') {
        parser->at++;
        if (!skip_digits(parser))
            return fail(parser, "bad number");
    }
    if (parser->at < parser->end && (*parser->at == 'e' || *parser->at == 'E')) {
        parser->at++;
        if (parser->at < parser->end && (*parser->at == '+' || *parser->at == '-'))
            parser->at++;
        if (!skip_digits(parser))
            return fail(parser, "bad number");
    }
    return true;
}

static bool parse_word(struct parser *parser, const char *word)
{
    size_t length = strlen(word);
    if ((size_t)(parser->end - parser->at) < length || memcmp(parser->at, word, length) != 0)
        return fail(parser, "unexpected character");
    parser->at += length;
    return true;
}

static bool parse_value(struct parser *parser);

static bool parse_array(struct parser *parser)
{
    parser->at++;
    if (consume(parser, ']'))
        return true;
    do {
        if (!parse_value(parser))
            return false;
    } while (consume(parser, ','));
    return expect(parser, ']', "expected ',' or ']'");
}

/* A string member value the request looks at: *is_string says whether it was one. */
static bool parse_member(struct parser *parser, struct slice *value, bool *is_string)
{
    *is_string = next_is(parser, '"');
    return *is_string ? parse_string(parser, value) : parse_value(parser);
}

static bool is_name(struct slice name, const char *wanted)
{
    return name.length == strlen(wanted) && memcmp(name.data, wanted, name.length) == 0;
}

/* The "keys" member: request->keys_is_list says whether it was a list of strings only. */
static bool parse_keys(struct parser *parser, struct request *request)
{
    request->keys_is_list = next_is(parser, '[');
    request->key_count = 0;
    if (!request->keys_is_list)
        return parse_value(parser);
    if (++parser->depth > MAX_NESTING)
        return fail(parser, "nested too deep");
    parser->at++;
    bool ok = true;
    if (!consume(parser, ']')) {
        do {
            struct slice key;
            if (!next_is(parser, '"')) {
                request->keys_is_list = false;
                ok = parse_value(parser);
            } else if ((ok = parse_string(parser, &key))) {
                if (request->key_count < MAX_FDS_PER_MESSAGE)
                    request->keys[request->key_count] = key;
                request->key_count++;
            }
        } while (ok && consume(parser, ','));
        ok = ok && expect(parser, ']', "expected ',' or ']'");
    }
    parser->depth--;
    return ok;
}

/* An object; with `request`, its "op", "key" and "keys" are kept (the last of duplicates
 * wins, as in Python's json) and other members are skipped. */
static bool parse_object(struct parser *parser, struct request *request)
{
    parser->at++;
    if (consume(parser, '}'))
        return true;
    do {
        struct slice name, ignored;
        bool ignored_is_string;
        if (!parse_string(parser, &name) || !expect(parser, ':', "expected ':'"))
            return false;
        bool ok;
        if (request != NULL && is_name(name, "op"))
            ok = parse_member(parser, &request->op, &request->op_is_string);
        else if (request != NULL && is_name(name, "key"))
            ok = parse_member(parser, &request->key, &request->key_is_string);
        else if (request != NULL && is_name(name, "keys"))
            ok = parse_keys(parser, request);
        else
            ok = parse_member(parser, &ignored, &ignored_is_string);
        if (!ok)
            return false;
    } while (consume(parser, ','));
    return expect(parser, '}', "expected ',' or '}'");
}

static bool parse_value(struct parser *parser)
{
    struct slice ignored;
    skip_space(parser);
    if (parser->at == parser->end)
        return fail(parser, "expected a value");
    if (++parser->depth > MAX_NESTING)
        return fail(parser, "nested too deep");
    bool ok;
    switch (*parser->at) {
    case '{': ok = parse_object(parser, NULL); break;
    case '[': ok = parse_array(parser); break;
    case '"': ok = parse_string(parser, &ignored); break;
    case 't': ok = parse_word(parser, "true"); break;
    case 'f': ok = parse_word(parser, "false"); break;
    case 'n': ok = parse_word(parser, "null"); break;
    case '-': ok = parse_number(parser); break;
    default:
        ok = *parser->at >= '0' && *parser->at <= '9' ? parse_number(parser)
                                                      : fail(parser, "unexpected character");
    }
    parser->depth--;
    return ok;
}

/* Read `text` (decoded in place) as a request; false with what is wrong in `error`. */
static bool parse_request(char *text, size_t length, struct request *request, char *error,
                          size_t error_size)
{
    struct parser parser = {.at = text, .start = text, .end = text + length};
    *request = (struct request){0};
    if (next_is(&parser, '{')) {
        if (parse_object(&parser, request) && (skip_space(&parser), parser.at != parser.end))
            fail(&parser, "extra data");
    } else if (parse_value(&parser)) {
        snprintf(error, error_size, "not a JSON object");
        return false;
    }
    if (parser.error != NULL)
        snprintf(error, error_size, "invalid JSON at byte %td: %s", parser.at - parser.start,
                 parser.error);
    return parser.error == NULL;
}

/* ---- writing a reply ---- */

static void put_bytes(struct output *output, const char *data, size_t length)
{
    if (output->failed)
        return;
    if (output->capacity - output->length < length) {
        size_t capacity = output->capacity ? output->capacity : 256;
        while (capacity - output->length < length)
            capacity *= 2;
        char *grown = realloc(output->data, capacity);
        if (grown == NULL) {
            output->failed = true;
            return;
        }
        output->data = grown;
        output->capacity = capacity;
    }
    memcpy(output->data + output->length, data, length);
    output->length += length;
}

static void put_text(struct output *output, const char *text)
{
    put_bytes(output, text, strlen(text));
}

static void append_to_output(void *output, const char *bytes, size_t length)
{
    put_bytes(output, bytes, length);
}

/* `text` (valid UTF-8) as a JSON string in ASCII, escaped as Python's json.dumps does. */
static void put_string(struct output *output, struct slice text)
{
    json_append_string(append_to_output, output, text.data, text.length);
}

static void put_keys(struct output *output, const struct table *table)
{
    put_text(output, "{\"ok\": true, \"keys\": [");
    for (size_t i = 0; i < table->count; i++) {
        if (i > 0)
            put_text(output, ", ");
        put_string(output, (struct slice){table->entries[i]->key, table->entries[i]->length});
    }
    put_text(output, "]}");
}

static void put_failure(struct output *output, const char *error)
{
    put_text(output, "{\"ok\": false, \"error\": ");
    put_string(output, (struct slice){error, strlen(error)});
    put_text(output, "}");
}

static void put_error(struct output *output, const char *error)
{
    char message[128];
    snprintf(message, sizeof message, "bad request: %s", error);
    put_failure(output, message);
}

/* ---- the connection ---- */

static bool send_reply(int conn, struct output *output, int fd)
{
    static const char out_of_memory[] = "{\"ok\": false, \"error\": \"out of memory\"}";
    struct iovec data = {output->data, output->length};
    if (output->failed)
        data = (struct iovec){(char *)out_of_memory, sizeof out_of_memory - 1};
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(int))];
    } control = {0};
    struct msghdr message = {.msg_iov = &data, .msg_iovlen = 1};
    if (fd >= 0 && !output->failed) {
        message.msg_control = control.space;
        message.msg_controllen = sizeof control.space;
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        *header = (struct cmsghdr){
            .cmsg_len = CMSG_LEN(sizeof(int)), .cmsg_level = SOL_SOCKET, .cmsg_type = SCM_RIGHTS};
        memcpy(CMSG_DATA(header), &fd, sizeof fd);
    }
    ssize_t sent;
    do
        sent = sendmsg(conn, &message, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent >= 0;
}

static void close_fds(struct fds *fds)
{
    for (size_t i = 0; i < fds->count; i++)
        close(fds->fd[i]);
    fds->count = 0;
}

static void collect_fds(struct msghdr *message, struct fds *fds)
{
    for (struct cmsghdr *header = CMSG_FIRSTHDR(message); header != NULL;
         header = CMSG_NXTHDR(message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && fds->count < MAX_FDS_PER_MESSAGE; i++)
            memcpy(&fds->fd[fds->count++], CMSG_DATA(header) + i * sizeof(int), sizeof(int));
    }
}

/* One message into `buffer`: its length, 0 once the supervisor is gone, -1 on an error;
 * *flags gets recvmsg's flags (MSG_TRUNC, MSG_CTRUNC). */
static ssize_t receive(int conn, char *buffer, struct fds *fds, int *flags)
{
    static union {
        struct cmsghdr header;
        char space[CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int))];
    } control;
    struct iovec data = {buffer, MAX_MESSAGE};
    struct msghdr message = {
        .msg_iov = &data, .msg_iovlen = 1, .msg_control = control.space,
        .msg_controllen = sizeof control.space};
    ssize_t length;
    do
        length = recvmsg(conn, &message, MSG_CMSG_CLOEXEC);
    while (length < 0 && errno == EINTR);
    fds->count = 0;
    if (length >= 0)
        collect_fds(&message, fds);
    *flags = message.msg_flags;
    return length;
}

enum outcome { SERVE_ON, SUPERVISOR_GONE, QUIT };

/* A keep of "keys" (else of "key"): one fd per key. */
static void keep_listed(struct request *request, struct fds *fds, struct table *table,
                        struct output *output)
{
    bool listed = request->keys_is_list;
    const struct slice *keys = listed ? request->keys : &request->key;
    size_t count = listed ? request->key_count : 1;
    if (fds->count != count)
        put_error(output, listed ? "keep needs one fd per key" : "keep needs exactly one fd");
    else if (!table_keep_all(table, keys, fds))
        put_failure(output, "out of memory");
    else
        put_text(output, "{\"ok\": true}");
}

/* Answer `request` into `output`; the fd a `take` sends back goes to *reply_fd, and a `keep`
 * takes its fds out of `fds`. */
static enum outcome answer(struct request *request, struct fds *fds, struct table *table,
                           struct output *output, int *reply_fd)
{
    struct slice op = request->op_is_string ? request->op : (struct slice){"", 0};
    bool keyed = request->key_is_string;
    bool found = false;
    size_t at = keyed ? table_find(table, request->key, &found) : 0;
    bool listed = request->keys_is_list;
    if (is_name(op, "keep") && (listed || keyed)) {
        keep_listed(request, fds, table, output);
    } else if (is_name(op, "take") && found) {
        *reply_fd = table->entries[at]->fd;
        put_text(output, "{\"ok\": true}");
    } else if (is_name(op, "drop") && keyed) {
        table_drop(table, request->key);
        put_text(output, "{\"ok\": true}");
    } else if (is_name(op, "list")) {
        put_keys(output, table);
    } else if (is_name(op, "quit")) {
        put_text(output, "{\"ok\": true}");
        return QUIT;
    } else if (is_name(op, "take") && keyed) {
        put_error(output, "no such key");
    } else if (is_name(op, "keep") || is_name(op, "take") || is_name(op, "drop")) {
        put_error(output, "key missing or not a string");
    } else {
        put_error(output, "unknown op");
    }
    return SERVE_ON;
}

/* Read, answer and reply to one request. */
static enum outcome serve_one(int conn, struct table *table)
{
    static char buffer[MAX_MESSAGE];
    struct fds fds;
    int flags;
    ssize_t length = receive(conn, buffer, &fds, &flags);
    if (length <= 0) {
        close_fds(&fds);
        return SUPERVISOR_GONE;
    }
    struct output output = {0};
    struct request request;
    char error[96] = "";
    int reply_fd = -1;
    enum outcome outcome = SERVE_ON;
    if (flags & MSG_TRUNC)
        snprintf(error, sizeof error, "message longer than %d bytes", MAX_MESSAGE);
    else if (flags & MSG_CTRUNC)
        snprintf(error, sizeof error, "more than %d fds", MAX_FDS_PER_MESSAGE);
    else
        parse_request(buffer, (size_t)length, &request, error, sizeof error);
    if (*error != '\0')
        put_error(&output, error);
    else
        outcome = answer(&request, &fds, table, &output, &reply_fd);
    close_fds(&fds);
    if (!send_reply(conn, &output, reply_fd))
        outcome = outcome == QUIT ? QUIT : SUPERVISOR_GONE;
    free(output.data);
    return outcome;
}

/* Answer one supervisor until it goes away; false once it asked this process to quit. */
static bool serve(int conn, struct table *table)
{
    enum outcome outcome;
    do
        outcome = serve_one(conn, table);
    while (outcome == SERVE_ON);
    return outcome != QUIT;
}

static bool same_user(int conn)
{
    struct ucred credentials;
    socklen_t size = sizeof credentials;
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &credentials, &size) < 0)
        return false;
    return credentials.uid == geteuid();
}

/* ---- waiting ---- */

/* Seconds as poll's milliseconds, rounded up. */
static int poll_milliseconds(double seconds)
{
    double milliseconds = seconds * 1000;
    if (milliseconds >= INT_MAX)
        return INT_MAX;
    int whole = (int)milliseconds;
    return whole < milliseconds ? whole + 1 : whole;
}

static double now(void)
{
    struct timespec clock;
    clock_gettime(CLOCK_MONOTONIC, &clock);
    return (double)clock.tv_sec + (double)clock.tv_nsec / 1e9;
}

/* Wait until a supervisor connects (true), or until `idle` seconds have passed without one
 * and everything held is hung up (false). */
static bool wait_for_supervisor(int listener, const struct table *table, double idle)
{
    double deadline = now() + idle;
    double recheck = idle < RECHECK_SECONDS ? idle : RECHECK_SECONDS;
    struct pollfd polled = {.fd = listener, .events = POLLIN};
    while (true) {
        double remaining = deadline - now();
        int ready = poll(&polled, 1, poll_milliseconds(remaining > 0 ? remaining : recheck));
        if (ready > 0)
            return true;
        if (ready < 0 && errno != EINTR)
            return true;
        if (now() >= deadline && all_hung_up(table))
            return false;
    }
}

/* The next connection, or -1 when there is none to take this time. */
static int accept_supervisor(int listener)
{
    int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED || errno == EPROTO)
            return -1;
        perror("grenadine-keep: accept");
        exit(1);
    }
    return conn;
}

/* ---- start ---- */

static void raise_fd_limit(void)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

static bool parse_arguments(int argc, char **argv, int *listener, double *idle)
{
    char *end;
    if (argc < 2 || argc > 3)
        return false;
    long fd = strtol(argv[1], &end, 10);
    if (*argv[1] == '\0' || *end != '\0' || fd < 0 || fd > INT_MAX)
        return false;
    *listener = (int)fd;
    *idle = DEFAULT_IDLE_SECONDS;
    if (argc == 3) {
        *idle = strtod(argv[2], &end);
        if (*argv[2] == '\0' || *end != '\0' || !isfinite(*idle) || *idle <= 0)
            return false;
    }
    return fcntl(*listener, F_SETFD, FD_CLOEXEC) == 0;
}

int main(int argc, char **argv)
{
    int listener;
    double idle;
    prctl(PR_SET_NAME, PROCESS_NAME);
    if (!parse_arguments(argc, argv, &listener, &idle)) {
        fputs("usage: grenadine-keep FD [IDLE_SECONDS] (FD: a listening unix socket,"
              " IDLE_SECONDS > 0)\n", stderr);
        return 2;
    }
    raise_fd_limit();
    struct table table = {0};
    bool serving = true;
    while (serving && wait_for_supervisor(listener, &table, idle)) {
        int conn = accept_supervisor(listener);
        if (conn < 0)
            continue;
        if (same_user(conn))
            serving = serve(conn, &table);
        close(conn);
    }
    table_clear(&table);
    close(listener);
    return 0;
}
