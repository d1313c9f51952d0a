#!/bin/sh
# netwarden container entrypoint.
#
# The image carries both iptables backends (iptables-nft and iptables-legacy). The agent talks to
# them by their explicit names and picks the host's with `--iptables-backend auto` (the default):
# the backend whose tables already hold rules, as kube-proxy and the CNI left them. So nothing
# needs switching here. The Debian alternative behind the plain `iptables` name is pointed at the
# same backend anyway, for an operator running `kubectl exec … iptables-save` — but only when the
# root filesystem is writable; with readOnlyRootFilesystem (the DaemonSet's default) it is left as
# it is, which changes nothing for the agent.
set -eu

if [ "${NETWARDEN_SET_IPTABLES_ALTERNATIVE:-1}" = 1 ] && [ -w /etc/alternatives ]; then
    legacy=$( (iptables-legacy-save 2>/dev/null || true) | grep -c '^-' || true)
    nft=$( (iptables-nft-save 2>/dev/null || true) | grep -c '^-' || true)
    if [ "${legacy:-0}" -gt "${nft:-0}" ]; then mode=legacy; else mode=nft; fi
    for t in iptables ip6tables; do
        update-alternatives --set "$t" "/usr/sbin/$t-$mode" >/dev/null 2>&1 || true
    done
fi

exec /usr/local/bin/netwarden "$@"
