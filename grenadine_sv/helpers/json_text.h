/* JSON text for grenadine-sv's helpers (grenadine-keep.c, grenadine-launch.c): decoding UTF-8
 * and writing a JSON string as Python's json.dumps does, in one place for both.
 *
 * Each helper is a single translation unit that includes this header; its functions are
 * `static inline`, so a helper that calls only some of them gets no unused-function warning.
 * A JSON string is written through a callback (json_append_fn) that appends bytes to the
 * helper's own output buffer.
 */
#ifndef GRENADINE_JSON_TEXT_H
#define GRENADINE_JSON_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- UTF-8 ---- */

/* The length of the valid UTF-8 sequence at `s` (at most `left` bytes, at least 1), its code
 * point in *code_point; or 0 when the bytes at `s` start no valid sequence: a continuation
 * byte or a byte never used in UTF-8 (0xC0, 0xC1, 0xF5..0xFF) first, a sequence cut short (by
 * `left` or by a byte that is not a continuation), an overlong form, a surrogate
 * (U+D800..U+DFFF) or a code point above U+10FFFF. */
static inline size_t utf8_sequence(const unsigned char *s, size_t left, uint32_t *code_point)
{
    static const uint32_t least[] = {0, 0, 0x80, 0x800, 0x10000};
    size_t length;
    uint32_t code;
    if (s[0] < 0x80)
        length = 1, code = s[0];
    else if (s[0] >= 0xC2 && s[0] <= 0xDF)
        length = 2, code = s[0] & 0x1F;
    else if (s[0] >= 0xE0 && s[0] <= 0xEF)
        length = 3, code = s[0] & 0x0F;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4)
        length = 4, code = s[0] & 0x07;
    else
        return 0;
    if (left < length)
        return 0;
    for (size_t i = 1; i < length; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        code = code << 6 | (s[i] & 0x3F);
    }
    bool surrogate = code >= 0xD800 && code <= 0xDFFF;
    if (code < least[length] || code > 0x10FFFF || surrogate)
        return 0;
    *code_point = code;
    return length;
}

/* The code point at `s` (at most `left` bytes, at least 1) as Python decodes UTF-8 with
 * errors="surrogateescape": a byte that starts no valid sequence is U+DC80..U+DCFF on its
 * own. Returns how many bytes it took. */
static inline size_t utf8_next_code_point(const unsigned char *s, size_t left,
                                          uint32_t *code_point)
{
    size_t length = utf8_sequence(s, left, code_point);
    if (length > 0)
        return length;
    *code_point = 0xDC00 | s[0];
    return 1;
}

/* ---- JSON strings ---- */

/* Appends `length` bytes at `bytes` to `sink`, the helper's own output buffer. */
typedef void json_append_fn(void *sink, const char *bytes, size_t length);

/* A UTF-16 code unit as \uXXXX. */
static inline void json_append_unit(json_append_fn *append, void *sink, uint32_t unit)
{
    static const char hex[] = "0123456789abcdef";
    char escape[] = {'\\', 'u', hex[unit >> 12 & 0xF], hex[unit >> 8 & 0xF],
                     hex[unit >> 4 & 0xF], hex[unit & 0xF]};
    append(sink, escape, sizeof escape);
}

/* The two-character escape of `code`, or NULL when it has none. */
static inline const char *json_short_escape(uint32_t code)
{
    switch (code) {
    case '"': return "\\\"";
    case '\\': return "\\\\";
    case '\n': return "\\n";
    case '\r': return "\\r";
    case '\t': return "\\t";
    case '\b': return "\\b";
    case '\f': return "\\f";
    default: return NULL;
    }
}

/* The `length` bytes at `string` as a JSON string in ASCII, escaped as Python's json.dumps
 * escapes the str they decode to (UTF-8 with errors="surrogateescape", so a byte that starts
 * no valid sequence is written as \udc80..\udcff). */
static inline void json_append_string(json_append_fn *append, void *sink, const char *string,
                                      size_t length)
{
    append(sink, "\"", 1);
    for (size_t i = 0, taken; i < length; i += taken) {
        uint32_t code;
        taken = utf8_next_code_point((const unsigned char *)string + i, length - i, &code);
        const char *escape = json_short_escape(code);
        if (escape != NULL) {
            append(sink, escape, 2);
        } else if (code >= 0x20 && code < 0x7F) {
            append(sink, string + i, 1);
        } else if (code < 0x10000) {
            json_append_unit(append, sink, code);
        } else {
            json_append_unit(append, sink, 0xD800 + ((code - 0x10000) >> 10));
            json_append_unit(append, sink, 0xDC00 + ((code - 0x10000) & 0x3FF));
        }
    }
    append(sink, "\"", 1);
}

#endif
