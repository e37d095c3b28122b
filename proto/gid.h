/*
 * gid.h - global transaction ids: the one codec and the one validator.
 *
 * A paycoord gid is "pc:<node>:<payment>", where <node> is the daemon's node
 * id (1-32 of A-Z a-z 0-9 _ -) and <payment> is the payment's uuid in
 * lower-case base32 (RFC 4648 alphabet, 26 characters, no padding), so that a
 * gid is at most 62 characters: every processor accepts it as an idempotency
 * key (Adyen allows 64). Gids made by paycoord 0.1 carry the uuid as 32 hex
 * digits (up to 68 characters); they are still parsed and settled.
 *
 * PostgreSQL itself accepts any gid of printable characters; operators may
 * name foreign gids (resolve), so gid_valid() is that wider rule, and
 * gid_parse() tells whether a gid is one of ours.
 */
#ifndef PAYCOORD_GID_H
#define PAYCOORD_GID_H

#include <stdbool.h>
#include <stddef.h>

#define GID_NODE_MAX 32
#define GID_MAX 200                    /* longest gid accepted anywhere (PROTO_GID_MAX) */
#define GID_OURS_MAX (3 + GID_NODE_MAX + 1 + 32)
#define UUID_TEXT_LEN 36

/* A node id: 1..32 of A-Z a-z 0-9 _ -. */
bool gid_valid_node(const char *node);
/* Any gid PostgreSQL would take and an operator may name: 1..GID_MAX bytes of 0x20..0x7E. */
bool gid_valid(const char *s, size_t len);

/* Make our gid for a canonical lower-case uuid text; out holds at least GID_OURS_MAX + 1. Returns 0 or -1. */
int gid_make(const char *node, const char *uuid, char *out, size_t outlen);
/* Parse one of our gids (either form). node_out (GID_NODE_MAX + 1) and uuid_out (UUID_TEXT_LEN + 1) may
 * be NULL. Returns false when the gid is not a paycoord gid. */
bool gid_parse(const char *gid, char *node_out, char *uuid_out);
/* "pc:<node>:" into out; returns its length, or 0 if it does not fit. */
size_t gid_prefix(const char *node, char *out, size_t outlen);

/* A fresh random (version 4) uuid, lower-case canonical text. */
void gid_new_uuid(char out[UUID_TEXT_LEN + 1]);
/* Replace the source of fresh uuids (a simulation makes them from its seed);
 * NULL restores libuuid's random ones. */
void gid_set_uuid_source(void (*fill)(unsigned char bytes[16]));
/* Canonical uuid text (8-4-4-4-12 hex, either case accepted, lower-case written). */
bool gid_uuid_parse(const char *s, unsigned char bytes[16]);
void gid_uuid_format(const unsigned char bytes[16], char out[UUID_TEXT_LEN + 1]);

#endif
