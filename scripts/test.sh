#!/usr/bin/env bash
# The test command: `bash scripts/test.sh [pytest args...]`
#
# Works on a fresh machine that only has Python 3.11 + pip:
#   * as root, installs the real servers the tests use (Debian redis-server and
#     postgresql) if they are missing;
#   * creates .venv if missing and installs the project with its `test` extra
#     (skipped when pyproject.toml has not changed since the last install);
#   * runs pytest with the given arguments and exits with pytest's exit code.
# Idempotent: re-running only does what is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.datapunk-test-install.stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export DEBIAN_FRONTEND=noninteractive

log() { printf '[test.sh] %s\n' "$*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }

have_redis() {  # redis-server, and redis-cli (it forms the test Redis Cluster)
    { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; } \
        && { command -v redis-cli >/dev/null 2>&1 || [ -x /usr/bin/redis-cli ]; }
}
have_initdb() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1. system packages: the real servers --------------------------------------------
if ! have_redis || ! have_initdb; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "installing redis-server and postgresql with apt-get"
        # Keep the packages' own services from starting (the tests start private ones).
        policy_created=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            policy_created=1
        fi
        rc=0
        apt_install redis-server redis-tools postgresql || rc=$?
        if [ "$policy_created" -eq 1 ]; then
            rm -f /usr/sbin/policy-rc.d
        fi
        if [ "$rc" -ne 0 ]; then
            log "apt-get install failed (exit $rc)"
            exit "$rc"
        fi
    else
        log "WARNING: redis-server and/or PostgreSQL initdb missing and cannot install" \
            "(not root or no apt-get): tests needing them are skipped (they fail under CI=true)"
    fi
fi

# --- 2. virtualenv ------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        rm -rf "$VENV"
        if is_root && command -v apt-get >/dev/null 2>&1; then
            log "python venv failed; installing python3-venv"
            apt_install python3-venv
            "$PYTHON" -m venv "$VENV"
        else
            log "cannot create $VENV with $PYTHON -m venv"
            exit 1
        fi
    fi
fi

# --- 3. project + test dependencies ---------------------------------------------------------
want_stamp="$("$VENV/bin/python" -c 'import sys; print(sys.version)' | tr -d '\n')|$(sha256sum pyproject.toml | cut -d' ' -f1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [ "${TEST_SH_FORCE_INSTALL:-0}" = 1 ] || [ "$want_stamp" != "$have_stamp" ] \
    || ! "$VENV/bin/python" -c 'import datapunk_recovery' >/dev/null 2>&1; then
    log "installing the project with its test extra into $VENV"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    printf '%s' "$want_stamp" >"$STAMP"
fi

# --- 4. the tests -------------------------------------------------------------------------------
# Nothing may depend on chance: every run draws its own hash seed and hypothesis
# seed, and prints both, so that a failure can be replayed exactly with
#   PYTHONHASHSEED=<n> HYPOTHESIS_SEED=<m> bash scripts/test.sh <same args>
draw_seed() { "$VENV/bin/python" -c 'import random; print(random.randrange(1, 2**32))'; }
if [ -z "${PYTHONHASHSEED:-}" ] || [ "$PYTHONHASHSEED" = random ]; then
    PYTHONHASHSEED="$(draw_seed)"
fi
export PYTHONHASHSEED
seed_args=()
case " $* " in
*" --hypothesis-seed"*) HYPOTHESIS_SEED="(given in the arguments)" ;;
*)
    HYPOTHESIS_SEED="${HYPOTHESIS_SEED:-$(draw_seed)}"
    seed_args=("--hypothesis-seed=$HYPOTHESIS_SEED")
    ;;
esac
log "PYTHONHASHSEED=$PYTHONHASHSEED HYPOTHESIS_SEED=$HYPOTHESIS_SEED" \
    "(replay: PYTHONHASHSEED=$PYTHONHASHSEED HYPOTHESIS_SEED=$HYPOTHESIS_SEED bash scripts/test.sh $*)"
exec "$VENV/bin/python" -m pytest "${seed_args[@]}" "$@"
