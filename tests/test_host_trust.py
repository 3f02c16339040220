"""Which hosts an unsecured cluster's node takes node-to-node requests from (kvs.node.trust).

Requests come from IP addresses; a view may name nodes by host name or bracketed IPv6 literal. Before,
the view's hosts were compared as strings with the caller's IP: a view of names (or of "[::1]") made
every node refuse every other's internal requests."""

from __future__ import annotations

from kvs.node.trust import RESOLVE_SECONDS, HostTrust, canonical_ip


class FakeDns:
    def __init__(self, table: dict[str, set[str]]):
        self.table, self.lookups = table, []

    def __call__(self, name: str) -> set[str]:
        self.lookups.append(name)
        if name not in self.table:
            raise OSError("name or service not known")
        return self.table[name]


def test_ip_addresses_are_compared_in_canonical_form():
    trust = HostTrust(["10.10.0.2:13800", "[::1]:13800", "[0:0:0:0:0:ffff:a0a:5]:1"], resolve=FakeDns({}))
    assert trust.trusts("10.10.0.2") and trust.trusts("::1") and trust.trusts("0:0::1")
    assert trust.trusts("::ffff:10.10.0.5")
    assert not trust.trusts("10.10.0.3") and not trust.trusts("not-an-ip") and not trust.trusts("")
    assert canonical_ip("[::1]") == "::1" and canonical_ip("node1") is None


def test_names_in_a_view_are_resolved_and_trusted_by_their_addresses():
    dns = FakeDns({"node1": {"10.10.0.2"}, "localhost": {"127.0.0.1", "::1"}})
    trust = HostTrust(["node1:13800", "localhost:13801"], resolve=dns)
    assert trust.trusts("10.10.0.2") and trust.trusts("127.0.0.1") and trust.trusts("::1")
    assert not trust.trusts("10.10.0.9") and not trust.trusts("node1")    # a socket reports IPs, not names


def test_a_name_is_looked_up_again_only_after_a_while_and_keeps_its_addresses_if_dns_fails():
    now = [1000.0]
    dns = FakeDns({"node1": {"10.10.0.2"}})
    trust = HostTrust(["node1:13800"], resolve=dns, clock=lambda: now[0])
    trust.refresh(["node1:13800"])
    assert dns.lookups == ["node1"]
    now[0] += RESOLVE_SECONDS + 1
    dns.table.clear()                              # DNS down: the last addresses stay trusted
    trust.refresh(["node1:13800"])
    assert dns.lookups == ["node1", "node1"] and trust.trusts("10.10.0.2")


def test_a_node_no_longer_in_any_view_is_no_longer_trusted():
    dns = FakeDns({"node1": {"10.10.0.2"}, "node2": {"10.10.0.3"}})
    trust = HostTrust(["node1:13800", "node2:13800", "10.10.0.4:13800"], resolve=dns)
    trust.refresh(["node1:13800"])
    assert trust.trusts("10.10.0.2") and not trust.trusts("10.10.0.3") and not trust.trusts("10.10.0.4")


def test_localhost_resolves_to_a_loopback_address_here():
    trust = HostTrust(["localhost:13800"])         # the real resolver (/etc/hosts)
    assert trust.trusts("127.0.0.1") or trust.trusts("::1")
