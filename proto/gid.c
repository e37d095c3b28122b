/* gid.c - the gid codec and validator (gid.h). */
#include "gid.h"
#include "proto_text.h"

#include <stdio.h>
#include <string.h>
#include <uuid/uuid.h>

static const char b32[] = "abcdefghijklmnopqrstuvwxyz234567";

bool gid_valid_node(const char *node)
{
    size_t n = strlen(node);
    if (n < 1 || n > GID_NODE_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = node[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return false;
    }
    return true;
}

bool gid_valid(const char *s, size_t len)
{
    if (len < 1 || len > GID_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

bool gid_uuid_parse(const char *s, unsigned char bytes[16])
{
    if (strlen(s) != UUID_TEXT_LEN)
        return false;
    int j = 0;
    for (int i = 0; i < UUID_TEXT_LEN;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
            i++;
            continue;
        }
        int hi = proto_hex_value((unsigned char)s[i]), lo = proto_hex_value((unsigned char)s[i + 1]);
        if (hi < 0 || lo < 0)
            return false;
        bytes[j++] = (unsigned char)(hi << 4 | lo);
        i += 2;
    }
    return true;
}

void gid_uuid_format(const unsigned char bytes[16], char out[UUID_TEXT_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    int k = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[k++] = '-';
        out[k++] = hex[bytes[i] >> 4];
        out[k++] = hex[bytes[i] & 15];
    }
    out[k] = '\0';
}

static void (*uuid_source)(unsigned char bytes[16]);

void gid_set_uuid_source(void (*fill)(unsigned char bytes[16])) { uuid_source = fill; }

void gid_new_uuid(char out[UUID_TEXT_LEN + 1])
{
    uuid_t u;
    if (uuid_source) {
        uuid_source(u);
        u[6] = (unsigned char)((u[6] & 0x0f) | 0x40);     /* version 4 */
        u[8] = (unsigned char)((u[8] & 0x3f) | 0x80);     /* RFC 4122 variant */
    } else {
        uuid_generate_random(u);
    }
    gid_uuid_format(u, out);
}

/* 128 bits -> 26 base32 characters (the last carries 3 bits). */
static void b32_encode(const unsigned char in[16], char out[27])
{
    unsigned int acc = 0;
    int bits = 0, k = 0;
    for (int i = 0; i < 16; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 5) {
            out[k++] = b32[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits > 0)
        out[k++] = b32[(acc << (5 - bits)) & 31];
    out[k] = '\0';
}

static bool b32_decode(const char *in, unsigned char out[16])
{
    unsigned int acc = 0;
    int bits = 0, k = 0;
    for (int i = 0; i < 26; i++) {
        const char *p = in[i] ? strchr(b32, in[i]) : NULL;
        if (!p)
            return false;
        acc = (acc << 5) | (unsigned int)(p - b32);
        bits += 5;
        if (bits >= 8) {
            out[k++] = (unsigned char)(acc >> (bits - 8));
            bits -= 8;
        }
    }
    /* 130 bits read: the last 2 are padding and must be zero (one spelling per uuid). */
    return k == 16 && (acc & ((1u << bits) - 1)) == 0;
}

size_t gid_prefix(const char *node, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "pc:%s:", node);
    return (n < 0 || (size_t)n >= outlen) ? 0 : (size_t)n;
}

int gid_make(const char *node, const char *uuid, char *out, size_t outlen)
{
    unsigned char bytes[16];
    char enc[27];
    if (!gid_valid_node(node) || !gid_uuid_parse(uuid, bytes))
        return -1;
    b32_encode(bytes, enc);
    int n = snprintf(out, outlen, "pc:%s:%s", node, enc);
    return (n < 0 || (size_t)n >= outlen) ? -1 : 0;
}

bool gid_parse(const char *gid, char *node_out, char *uuid_out)
{
    if (strncmp(gid, "pc:", 3) != 0)
        return false;
    const char *node = gid + 3;
    const char *colon = strchr(node, ':');
    if (!colon)
        return false;
    size_t nlen = (size_t)(colon - node);
    char nbuf[GID_NODE_MAX + 1];
    if (nlen < 1 || nlen > GID_NODE_MAX)
        return false;
    memcpy(nbuf, node, nlen);
    nbuf[nlen] = '\0';
    if (!gid_valid_node(nbuf))
        return false;
    const char *enc = colon + 1;
    size_t elen = strlen(enc);
    unsigned char bytes[16];
    if (elen == 26) {
        if (!b32_decode(enc, bytes))
            return false;
    } else if (elen == 32) {            /* paycoord 0.1: hex */
        for (int i = 0; i < 16; i++) {
            int hi = proto_hex_value((unsigned char)enc[2 * i]);
            int lo = proto_hex_value((unsigned char)enc[2 * i + 1]);
            if (hi < 0 || lo < 0 || (enc[2 * i] >= 'A' && enc[2 * i] <= 'F') ||
                (enc[2 * i + 1] >= 'A' && enc[2 * i + 1] <= 'F'))
                return false;
            bytes[i] = (unsigned char)(hi << 4 | lo);
        }
    } else {
        return false;
    }
    if (node_out)
        memcpy(node_out, nbuf, nlen + 1);
    if (uuid_out)
        gid_uuid_format(bytes, uuid_out);
    return true;
}
