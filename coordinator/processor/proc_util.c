/* proc_util.c - helpers the processor adapters share (proc_util.h). */
#include "proc_util.h"

#include <errno.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

const char *proc_log_value(char *buf, size_t size, const char *s)
{
    bool plain = *s != '\0';
    for (const char *p = s; *p && plain; p++)
        if (*p <= ' ' || *p == '"' || *p == '=' || *p == '\\' || *p == 0x7f)
            plain = false;
    if (plain && strlen(s) < size) {
        memcpy(buf, s, strlen(s) + 1);
        return buf;
    }
    size_t n = 0;
    buf[n++] = '"';
    for (const char *p = s; *p && n + 4 < size; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\')
            buf[n++] = '\\';
        buf[n++] = (ch < ' ' || ch == 0x7f) ? '?' : (char)ch;
    }
    buf[n++] = '"';
    buf[n] = '\0';
    return buf;
}

bool proc_copy(char *dst, size_t size, const char *src)
{
    size_t n = strlen(src);
    if (n >= size) {
        dst[0] = '\0';
        return false;
    }
    memcpy(dst, src, n + 1);
    return true;
}

bool proc_json_int(const cJSON *item, int64_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double d = item->valuedouble;
    if (!(d >= -9007199254740992.0 && d <= 9007199254740992.0))
        return false;
    int64_t v = (int64_t)d;
    if ((double)v != d)
        return false;
    *out = v;
    return true;
}

const char *proc_json_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static void escape(sbuf *b, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' ||
            *p == '_' || *p == '.' || *p == '~') {
            sbuf_add(b, (const char *)p, 1);
        } else {
            char e[3] = { '%', hex[*p >> 4], hex[*p & 15] };
            sbuf_add(b, e, 3);
        }
    }
}

void proc_form_add(sbuf *b, const char *key, const char *value)
{
    if (b->len > 0)
        sbuf_add(b, "&", 1);
    escape(b, key);
    sbuf_add(b, "=", 1);
    escape(b, value);
}

void proc_path_escape(sbuf *b, const char *s)
{
    escape(b, s);
}

int proc_meta_sorted(const cJSON *meta, const char **keys, const char **values, int max)
{
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, meta) {
        if (!cJSON_IsString(it) || it->string == NULL || it->string[0] == '\0' || n == max)
            continue;
        /* insertion sort: at most a few dozen keys */
        int i = n++;
        while (i > 0 && strcmp(keys[i - 1], it->string) > 0) {
            keys[i] = keys[i - 1];
            values[i] = values[i - 1];
            i--;
        }
        keys[i] = it->string;
        values[i] = it->valuestring;
    }
    return n;
}

bool proc_hmac_sha256(const unsigned char *key, size_t klen, const void *msg, size_t len, unsigned char out[32])
{
    static const unsigned char empty = 0;
    unsigned int outlen = 32;
    return HMAC(EVP_sha256(), klen ? key : &empty, (int)klen, msg, len, out, &outlen) != NULL && outlen == 32;
}

int proc_read_secret(const char *what, const char *path, char *out, size_t size, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s: %s", what, path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || (st.st_mode & (S_IROTH | S_IWOTH))) {
        snprintf(err, errlen, "%s: %s is readable or writable by others; chmod o-rw it", what, path);
        fclose(f);
        return -1;
    }
    size_t n = fread(out, 1, size - 1, f);
    bool more = fgetc(f) != EOF;
    fclose(f);
    out[n] = '\0';
    while (n && (out[n - 1] == '\n' || out[n - 1] == '\r' || out[n - 1] == ' ' || out[n - 1] == '\t'))
        out[--n] = '\0';
    if (more || !n || strpbrk(out, "\r\n")) {
        snprintf(err, errlen, "%s: %s must hold one non-empty line of at most %zu bytes", what, path, size - 1);
        return -1;
    }
    return 0;
}
