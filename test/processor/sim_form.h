/*
 * sim_form.h - application/x-www-form-urlencoded request bodies as Stripe
 * takes them: "a=1&metadata[gid]=pc%3Ax&expand[]=x". Keys and values are
 * percent-decoded ('+' is a space); keys must be name, name[sub] or
 * name[sub][sub2] (at most 3 brackets; "[]" for arrays). Every input is capped.
 */
#ifndef PSP_SIM_FORM_H
#define PSP_SIM_FORM_H

#include "sim_util.h"

#define SIM_FORM_MAX_PAIRS 512
#define SIM_FORM_KEY_MAX 256
#define SIM_FORM_VALUE_MAX 8192

typedef struct sim_form_pair {
    char *key; /* decoded, NUL-terminated */
    size_t key_len;
    char *val; /* decoded, NUL-terminated (no NUL inside: %00 is refused) */
    size_t val_len;
} sim_form_pair;

typedef struct sim_form {
    sim_form_pair *pairs;
    size_t n;
    char *buf; /* backing store of the decoded strings */
} sim_form;

/* Parses body[0..len) (a query string too). Returns -1 with a message in err
 * on a malformed escape, a bad key, a duplicate key (other than "x[]"), a
 * NUL, or a cap exceeded; out is then empty. */
int sim_form_parse(const char *body, size_t len, sim_form *out, char *err, size_t errlen) SIM_MUSTCHECK;
void sim_form_free(sim_form *f);

/* The value of the (decoded) key, or NULL. */
const sim_form_pair *sim_form_get(const sim_form *f, const char *key);

/* A hash of the set of pairs, independent of their order: Stripe compares
 * the parameters of a replay with those of the first request. */
uint64_t sim_form_fingerprint(const sim_form *f);

#endif
