"""The randomized crash driver as a test: PC_CRASH_ROUNDS rounds (200 under
CI=true, 25 otherwise), each seed printed; a failing seed reproduces with
`crash_driver.py --seed S --rounds 1` (see docs/recovery.md). PC_CRASH_FAULTS
(comma-separated) restricts the fault kinds, PC_CRASH_REUSE_P sets the
probability of a reuse race per round. The processor API is the suite's
(PC_PROCESSOR)."""

import os
import random

from crash_driver import Driver


def test_random_crash_rounds(env, capsys):
    rounds = int(os.environ.get("PC_CRASH_ROUNDS", "200" if os.environ.get("CI") == "true" else "25"))
    first = int(os.environ.get("PC_CRASH_SEED", random.randrange(1, 2**31)))
    out = os.path.join(os.environ.get("PAYCOORD_BUILD", "/tmp"), f"crash-rounds-{env.psp.mode}.log")
    logf = open(out, "w")       # run-tests.sh prints it: every seed, even when all pass

    def log(m):
        logf.write(m + "\n")
        logf.flush()
        with capsys.disabled():
            print(m, flush=True)

    faults = os.environ.get("PC_CRASH_FAULTS")
    kw = {"reuse_race_p": float(os.environ["PC_CRASH_REUSE_P"])} if os.environ.get("PC_CRASH_REUSE_P") else {}
    drv = Driver(env.pg, env.psp, env.workdir, log=log, faults=faults.split(",") if faults else None, **kw)
    try:
        drv.setup()
    finally:
        if drv.daemon:
            env.daemons.append(drv.daemon)       # killed at teardown
        if drv.proxy:
            env.proxies.append(drv.proxy)
    log(f"crash driver: {rounds} rounds from seed {first}, processor {env.psp.mode}")
    for i in range(rounds):
        drv.round(first + i)
    log(f"crash driver: {rounds} rounds passed, {len(drv.answers)} final answers checked, "
        f"{drv.reviews} reviews settled by the operator")
