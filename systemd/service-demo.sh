#!/bin/sh
# `make service-demo`: stage jetyolo into a throw-away rootfs, check the units with
# systemd-analyze (verify + security exposure) and list what was staged.
#   usage: systemd/service-demo.sh JETYOLO BUNDLE [WHEELHOUSE]
# Without WHEELHOUSE the aarch64 wheels are fetched with `pip download` (registry access);
# with it, that folder of wheels is staged as is (offline).
set -eu
JETYOLO=$1
BUNDLE=$2
WHEELHOUSE=${3:-}
command -v systemd-analyze >/dev/null || { echo "service-demo: systemd-analyze is missing (apt install systemd)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs
mkdir -p "$ROOT/etc" "$ROOT/usr"

echo "== jetyolo service install --rootfs $ROOT --bundle $BUNDLE (dry run, then for real)"
"$JETYOLO" service install --rootfs "$ROOT" --bundle "$BUNDLE" ${WHEELHOUSE:+--wheelhouse "$WHEELHOUSE"} --dry-run | tail -n 3
"$JETYOLO" service install --rootfs "$ROOT" --bundle "$BUNDLE" ${WHEELHOUSE:+--wheelhouse "$WHEELHOUSE"} >/dev/null
echo "== second install (idempotent):"
"$JETYOLO" service install --rootfs "$ROOT" --bundle "$BUNDLE" ${WHEELHOUSE:+--wheelhouse "$WHEELHOUSE"} | grep -E '^(staged|dry run)'

echo "== staged tree"
(cd "$ROOT" && find . \( -type f -o -type l \) ! -path './opt/jetyolo/wheelhouse/*' | sort | sed 's|^\.||')
echo "   /opt/jetyolo/wheelhouse: $(ls "$ROOT/opt/jetyolo/wheelhouse" | wc -l) files, $(du -sh "$ROOT/opt/jetyolo/wheelhouse" | cut -f1)"

# What a real rootfs has and this one lacks: systemd's own units, the tools the venv unit
# calls, and the venv (made at first boot), so that verify checks our units, not the sandbox.
mkdir -p "$ROOT/usr/lib/systemd" "$ROOT/usr/bin" "$ROOT/opt/jetyolo/venv/bin"
cp -a /usr/lib/systemd/system "$ROOT/usr/lib/systemd/"
for stub in usr/bin/systemd-sysusers usr/bin/systemd-tmpfiles opt/jetyolo/venv/bin/jetyolo; do
  printf '#!/bin/sh\n' > "$ROOT/$stub" && chmod 755 "$ROOT/$stub"
done
UNITS="jetyolo.service jetyolo-build.service jetyolo-venv.service"
echo "== systemd-analyze verify --root=ROOTFS $UNITS"
# shellcheck disable=SC2086
systemd-analyze verify --root="$ROOT" $UNITS && echo "   OK (no warnings)"
echo "== systemd-analyze security --offline=true (exposure, 0 = best, 10 = worst; test limit 3.0)"
for unit in $UNITS; do
  systemd-analyze security --offline=true --root="$ROOT" --no-pager "$unit" | tail -n 1
done
