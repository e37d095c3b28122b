/*
 * test_access.c - the permission classes (coordinator/core/access.c): the op ->
 * class table, parsing of the uid/gid lists, who holds which class under each
 * kind of configuration, and the refusal path (message, counters).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "access.h"
#include "config.h"

static void set(char **field, const char *v)
{
    free(*field);
    *field = strdup(v);
    assert_non_null(*field);
}

static const char *const class_of_op[PROTO_OP__COUNT] = {
    [PROTO_OP_PAY] = "pay", [PROTO_OP_STATUS] = "read", [PROTO_OP_CREDIT] = "credit",
    [PROTO_OP_BALANCE] = "read", [PROTO_OP_PING] = "read", [PROTO_OP_ACCOUNT_OPEN] = "admin",
    [PROTO_OP_PREPARED] = "admin", [PROTO_OP_RESOLVE] = "admin", [PROTO_OP_RECOVER] = "admin",
    [PROTO_OP_STATS] = "admin", [PROTO_OP_HEALTH] = "admin", [PROTO_OP_RECONCILE] = "admin",
    [PROTO_OP_RECONCILE_STATUS] = "admin", [PROTO_OP_DISCREPANCIES] = "admin",
    [PROTO_OP_SETTLE_DISCREPANCY] = "admin", [PROTO_OP_AUDIT] = "admin",
};

static void test_op_classes(void **state)
{
    (void)state;
    for (int i = 0; i < PROTO_OP__COUNT; i++) {
        access_class c = access_op_class((proto_op)i);
        assert_string_equal(access_class_name(c), class_of_op[i]);
        /* the admin class is exactly proto's list of admin ops */
        assert_int_equal(c == ACCESS_ADMIN, proto_op_is_admin((proto_op)i));
    }
    assert_int_equal(access_op_class(PROTO_OP__COUNT), ACCESS_ADMIN);
}

static void test_parse_lists(void **state)
{
    (void)state;
    pc_config cfg;
    config_defaults(&cfg);
    access_policy *p = malloc(sizeof(*p));
    assert_non_null(p);
    char err[256] = "";
    set(&cfg.processor_token_file, "/etc/paycoord/processor.token");   /* config_validate wants one */
    assert_int_equal(config_validate(&cfg, err, sizeof(err)), 0);

    set(&cfg.pay_uids, " 1001, 1002,,1003 ,");
    set(&cfg.client_uids, "2001");
    set(&cfg.credit_gids, "4294967294");
    assert_int_equal(access_policy_build(p, &cfg, 999, err, sizeof(err)), 0);
    assert_int_equal(p->uids[ACCESS_PAY].n, 4);        /* pay_uids + client_uids */
    assert_int_equal(p->uids[ACCESS_PAY].id[3], 2001);
    assert_int_equal(p->gids[ACCESS_CREDIT].id[0], 4294967294u);
    assert_false(p->open[ACCESS_PAY]);

    static const struct { const char *value; const char *want; } bad[] = {
        { "paycoord", "'paycoord' is not a number" },
        { "-1", "'-1' is not a number" },
        { "12a", "'12a' is not a number" },
        { "4294967295", "'4294967295' is not a number" },       /* (uid_t)-1 */
        { "99999999999999999999", "is not a number" },
        { "1;2", "'1;2' is not a number" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        set(&cfg.credit_uids, bad[i].value);
        err[0] = '\0';
        assert_int_equal(access_policy_build(p, &cfg, 999, err, sizeof(err)), -1);
        assert_non_null(strstr(err, "credit_uids: "));
        assert_non_null(strstr(err, bad[i].want));
        assert_int_equal(config_validate(&cfg, err, sizeof(err)), -1);   /* --check-config and reload see it */
        assert_non_null(strstr(err, "credit_uids: "));
    }
    set(&cfg.credit_uids, "");

    /* A hard cap per class: pay_uids and client_uids count together. */
    char big[ACCESS_MAX_IDS * 6 + 8];
    size_t n = 0;
    for (int i = 0; i < ACCESS_MAX_IDS; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "%d,", 10000 + i);
    set(&cfg.pay_uids, big);
    set(&cfg.client_uids, "");
    assert_int_equal(access_policy_build(p, &cfg, 999, err, sizeof(err)), 0);
    set(&cfg.client_uids, "7");
    assert_int_equal(access_policy_build(p, &cfg, 999, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "client_uids: more than 256 ids"));
    free(p);
    config_free(&cfg);
}

/* Which classes does (uid, gid) hold, as "RPCA" letters ('-' for missing)? */
static const char *held(const access_policy *p, uint32_t uid, uint32_t gid)
{
    static char out[5];
    const char letters[] = "RPCA";
    for (int c = 0; c < ACCESS__COUNT; c++)
        out[c] = access_policy_allows(p, uid, gid, (access_class)c) ? letters[c] : '-';
    out[4] = '\0';
    return out;
}

static void test_grants(void **state)
{
    (void)state;
    pc_config cfg;
    config_defaults(&cfg);
    access_policy *p = malloc(sizeof(*p));
    assert_non_null(p);
    char err[256];
    const uint32_t self = 998;

    /* Defaults: read and pay open; credit and admin only for root and self. */
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 65534, 65534), "RP--");
    assert_string_equal(held(p, 0, 0), "RPCA");
    assert_string_equal(held(p, self, 12345), "RPCA");
    assert_string_equal(held(p, ACCESS_NO_ID, ACCESS_NO_ID), "----");

    /* Granting credit alone keeps read and pay open (the usual upgrade step). */
    set(&cfg.credit_uids, "1002");
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 1002, 1002), "RPC-");
    assert_string_equal(held(p, 1001, 1001), "RP--");

    /* Any pay/read list closes read and pay to everyone else. */
    set(&cfg.pay_uids, "1001");
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 1001, 1001), "RP--");
    assert_string_equal(held(p, 1002, 1002), "R-C-");    /* credit includes read, not pay */
    assert_string_equal(held(p, 1003, 1003), "----");

    /* Gid grants match the effective gid; read alone. */
    set(&cfg.read_gids, "3000");
    set(&cfg.pay_gids, "3001");
    set(&cfg.credit_gids, "3002");
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 40000, 3000), "R---");
    assert_string_equal(held(p, 40000, 3001), "RP--");
    assert_string_equal(held(p, 40000, 3002), "R-C-");
    assert_string_equal(held(p, 3000, 40000), "----");   /* a uid is not a gid */

    /* Admin holds every class, by uid or gid. */
    set(&cfg.admin_uids, "1500");
    set(&cfg.admin_gids, "3500");
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 1500, 1), "RPCA");
    assert_string_equal(held(p, 40000, 3500), "RPCA");

    /* The 0.1 names grant pay and read, never credit. */
    config_free(&cfg);
    config_defaults(&cfg);
    set(&cfg.client_uids, "12345");
    set(&cfg.client_gids, "3100");
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 12345, 1), "RP--");
    assert_string_equal(held(p, 40000, 3100), "RP--");
    assert_string_equal(held(p, 65534, 65534), "----");  /* a list was set: not open any more */

    /* read_uids alone also closes pay. */
    config_free(&cfg);
    config_defaults(&cfg);
    set(&cfg.read_uids, "5000");
    assert_int_equal(access_policy_build(p, &cfg, self, err, sizeof(err)), 0);
    assert_string_equal(held(p, 5000, 5000), "R---");
    assert_string_equal(held(p, 5001, 5001), "----");
    free(p);
    config_free(&cfg);
}

static void test_check_and_counters(void **state)
{
    (void)state;
    pc_config cfg;
    config_defaults(&cfg);
    set(&cfg.pay_uids, "1001");
    set(&cfg.credit_uids, "1002");
    access_configure(&cfg);
    char why[200];
    uint64_t before = access_refused(PROTO_OP_CREDIT);
    assert_true(access_check(1001, 1001, 42, PROTO_OP_PAY, why, sizeof(why)));
    assert_true(access_check(1001, 1001, 42, PROTO_OP_STATUS, why, sizeof(why)));
    assert_false(access_check(1001, 1001, 42, PROTO_OP_CREDIT, why, sizeof(why)));
    assert_string_equal(why, "op credit needs the credit permission, which uid 1001 (gid 1001) does not hold");
    assert_int_equal(access_refused(PROTO_OP_CREDIT), before + 1);
    assert_false(access_check(1002, 77, 43, PROTO_OP_RESOLVE, why, sizeof(why)));
    assert_string_equal(why, "op resolve needs the admin permission, which uid 1002 (gid 77) does not hold");
    assert_true(access_check(0, 0, 1, PROTO_OP_RESOLVE, why, sizeof(why)));
    assert_true(access_check((uint32_t)geteuid(), 5, 1, PROTO_OP_CREDIT, why, sizeof(why)));
    /* Many refusals: every one counted (the log is rate limited, the counter is not). */
    for (int i = 0; i < 100; i++)
        assert_false(access_check(1003, 1003, 44, PROTO_OP_PING, why, sizeof(why)));
    assert_int_equal(access_refused(PROTO_OP_PING), 100);
    cJSON *o = access_refused_json();
    assert_non_null(o);
    assert_int_equal(cJSON_GetObjectItem(o, "ping")->valueint, 100);
    assert_int_equal(cJSON_GetObjectItem(o, "resolve")->valueint, 1);
    assert_int_equal(cJSON_GetArraySize(o), PROTO_OP__COUNT);
    cJSON_Delete(o);

    /* A policy that fails to build leaves the previous one in force. */
    set(&cfg.pay_uids, "nobody");
    access_configure(&cfg);
    assert_true(access_check(1001, 1001, 42, PROTO_OP_PAY, why, sizeof(why)));
    /* A good one replaces it at once. */
    set(&cfg.pay_uids, "1004");
    access_configure(&cfg);
    assert_false(access_check(1001, 1001, 42, PROTO_OP_PAY, why, sizeof(why)));
    assert_true(access_check(1004, 1004, 42, PROTO_OP_PAY, why, sizeof(why)));
    config_free(&cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_classes),
        cmocka_unit_test(test_parse_lists),
        cmocka_unit_test(test_grants),
        cmocka_unit_test(test_check_and_counters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
