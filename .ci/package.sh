#!/usr/bin/env bash
# The Debian package: built from the release binary CI already has, installed on this machine
# with dpkg, checked (version, config check against the packaged config with a development
# PKI, the service user and state directory, the systemd unit), then purged.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet
test -x target/release/civgate || cargo build --release --locked --quiet
cargo deb --no-build --quiet
deb=$(ls -t target/debian/civgate_*.deb | head -1)
cleanup() {
    dpkg --purge civgate >/dev/null 2>&1 || true
    rm -rf /etc/civgate /var/lib/civgate
}
trap cleanup EXIT
cleanup
dpkg -i "$deb"
/usr/bin/civgate --version
id civgate
test "$(stat -c '%U %a' /var/lib/civgate)" = "civgate 700"
test "$(stat -c '%G %a' /etc/civgate/civgate.toml)" = "civgate 640"
/usr/bin/civgate certs init --dir /etc/civgate/certs >/dev/null
/usr/bin/civgate config check --config /etc/civgate/civgate.toml
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /lib/systemd/system/civgate.service
fi
echo "package OK: $deb"
