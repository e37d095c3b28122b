/* sim_form.c - form-encoded bodies with bracketed keys (see sim_form.h). */
#include "sim_form.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes s[0..n) into out (room for n + 1); returns the length or -1. */
static long decode(const char *s, size_t n, char *out)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            int hi, lo;
            if (i + 2 >= n)
                return -1;
            if ((hi = hexval(s[i + 1])) < 0 || (lo = hexval(s[i + 2])) < 0)
                return -1;
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (c == '\0')
            return -1;
        out[j++] = c;
    }
    out[j] = '\0';
    return (long)j;
}

static bool name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* name, then up to 3 "[...]" groups without brackets or control bytes inside. */
static bool key_ok(const char *k, size_t n)
{
    size_t i = 0, groups = 0;
    while (i < n && name_char(k[i]))
        i++;
    if (i == 0)
        return false;
    while (i < n) {
        if (k[i] != '[' || ++groups > 3)
            return false;
        i++;
        while (i < n && k[i] != ']') {
            if (k[i] == '[' || (unsigned char)k[i] < 0x20)
                return false;
            i++;
        }
        if (i == n)
            return false; /* unclosed */
        i++;
    }
    return true;
}

static int fail(sim_form *out, char *err, size_t errlen, const char *msg)
{
    snprintf(err, errlen, "%s", msg);
    sim_form_free(out);
    return -1;
}

int sim_form_parse(const char *body, size_t len, sim_form *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (len == 0)
        return 0;
    size_t npairs = 1;
    for (size_t i = 0; i < len; i++)
        if (body[i] == '&')
            npairs++;
    if (npairs > SIM_FORM_MAX_PAIRS)
        return fail(out, err, errlen, "too many parameters");
    out->pairs = sim_xcalloc(npairs, sizeof(*out->pairs));
    out->buf = sim_xmalloc(len + 2 * npairs + 1);
    char *w = out->buf;
    size_t start = 0;
    while (start <= len) {
        const char *seg = body + start;
        const char *amp = memchr(seg, '&', len - start);
        size_t seglen = amp != NULL ? (size_t)(amp - seg) : len - start;
        start += seglen + 1;
        if (seglen == 0)
            continue;
        const char *eq = memchr(seg, '=', seglen);
        size_t klen = eq != NULL ? (size_t)(eq - seg) : seglen;
        size_t vlen = eq != NULL ? seglen - klen - 1 : 0;
        sim_form_pair *p = &out->pairs[out->n];
        long dk = decode(seg, klen, w);
        if (dk < 0)
            return fail(out, err, errlen, "malformed percent-encoding in a parameter name");
        p->key = w;
        p->key_len = (size_t)dk;
        w += dk + 1;
        long dv = decode(eq != NULL ? eq + 1 : seg + seglen, vlen, w);
        if (dv < 0)
            return fail(out, err, errlen, "malformed percent-encoding in a parameter value");
        p->val = w;
        p->val_len = (size_t)dv;
        w += dv + 1;
        if (p->key_len == 0 || p->key_len > SIM_FORM_KEY_MAX || !key_ok(p->key, p->key_len))
            return fail(out, err, errlen, "invalid parameter name");
        if (p->val_len > SIM_FORM_VALUE_MAX)
            return fail(out, err, errlen, "parameter value too long");
        bool array = p->key_len >= 2 && memcmp(p->key + p->key_len - 2, "[]", 2) == 0;
        if (!array)
            for (size_t i = 0; i < out->n; i++)
                if (out->pairs[i].key_len == p->key_len && memcmp(out->pairs[i].key, p->key, p->key_len) == 0)
                    return fail(out, err, errlen, "a parameter is given twice");
        out->n++;
    }
    return 0;
}

void sim_form_free(sim_form *f)
{
    free(f->pairs);
    free(f->buf);
    memset(f, 0, sizeof(*f));
}

const sim_form_pair *sim_form_get(const sim_form *f, const char *key)
{
    size_t n = strlen(key);
    for (size_t i = 0; i < f->n; i++)
        if (f->pairs[i].key_len == n && memcmp(f->pairs[i].key, key, n) == 0)
            return &f->pairs[i];
    return NULL;
}

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t sim_form_fingerprint(const sim_form *f)
{
    /* A sum of per-pair hashes does not depend on the order. */
    uint64_t sum = (uint64_t)f->n;
    for (size_t i = 0; i < f->n; i++) {
        uint64_t h = 1469598103934665603ULL;
        for (size_t j = 0; j < f->pairs[i].key_len; j++)
            h = (h ^ (unsigned char)f->pairs[i].key[j]) * 1099511628211ULL;
        h = (h ^ 0x3d) * 1099511628211ULL;
        for (size_t j = 0; j < f->pairs[i].val_len; j++)
            h = (h ^ (unsigned char)f->pairs[i].val[j]) * 1099511628211ULL;
        sum += mix(h);
    }
    return sum;
}
