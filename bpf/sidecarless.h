// SPDX-License-Identifier: Apache-2.0
// Map layouts, marks and reasons of the sidecarless datapath. The agent reads these layouts through BCC's
// table types, so this header is the one definition.
#pragma once


// Map sizes: the agent passes its flags as -D; these are the defaults.
#ifndef SCL_ENDPOINTS_MAX
#define SCL_ENDPOINTS_MAX 4096
#endif
#ifndef SCL_IPCACHE_MAX
#define SCL_IPCACHE_MAX 65536
#endif
#ifndef SCL_POLICY_MAX
#define SCL_POLICY_MAX 262144
#endif
#ifndef SCL_CONNTRACK_MAX
#define SCL_CONNTRACK_MAX 65536
#endif
#ifndef SCL_SOCKETS_MAX
#define SCL_SOCKETS_MAX 65536
#endif
#define SCL_FRAGMENTS_MAX 8192
// Hit counters of policy rules: entry `hit_index` counts at 2 * hit_index (flows allowed) and 2 * hit_index + 1
// (flows denied); 0 is no rule (an entry the agent gives none).
#define SCL_HITS_MAX 65536
#define SCL_EVENT_PAGES 64 /* 256 KiB ring buffer */

// Reserved identities (Cilium's numbers). SCL_IDENTITY_ANY in a policy key matches every peer.
#define SCL_IDENTITY_ANY 0
#define SCL_IDENTITY_HOST 1
#define SCL_IDENTITY_WORLD 2      /* an IPv4 address no other identity holds */
#define SCL_IDENTITY_WORLD_IPV6 10 /* an IPv6 address no other identity holds (Cilium's world-ipv6) */

// skb->mark for a flow handed to the proxy: 0x200 in the 0xf00 nibble (the ip rule and the nftables TPROXY
// rules match it), the proxy port in the upper 16 bits (an nftables rule per proxy port reads it).
#define SCL_MARK_TO_PROXY 0x200
// skb->mark for every other packet from_pod let through: to_pod, later on the same node, then knows the packet
// was decided and skips its own lookups. Crossing into a pod's namespace clears the mark.
#define SCL_MARK_DECIDED 0x100
// skb->mark of what Envoy's egress listener sends upstream (its sockets' SO_MARK): a connection from the pod's own
// address (IP_TRANSPARENT), so the destination's node sees the pod's identity. Only the node's own sockets can
// carry it: crossing from another namespace clears the mark.
#define SCL_MARK_FROM_PROXY 0xa00
#define SCL_MARK_MAGIC_MASK 0xf00

#define SCL_ENDPOINT_ENFORCE_INGRESS 1
#define SCL_ENDPOINT_ENFORCE_EGRESS 2
// Audit mode (policy/audit.py): an audited policy changes the pod's verdicts in a direction, so its entries
// carry the audit action, and the direction's audit default is the ENFORCE flag shifted once more.
#define SCL_ENDPOINT_AUDIT_SHIFT 2
#define SCL_ENDPOINT_AUDIT_ENFORCE_SHIFT 4

#define SCL_DIRECTION_INGRESS 0
#define SCL_DIRECTION_EGRESS 1

#define SCL_ACTION_NONE 0 /* no entry: dropped when the direction is enforced, else allowed */
#define SCL_ACTION_ALLOW 1
#define SCL_ACTION_REDIRECT 2
// An L7 port whose proxy configuration Envoy has not ACKed (or Envoy is gone): fail closed.
#define SCL_ACTION_PROXY_UNAVAILABLE 3
#define SCL_ACTION_DENY 4

// Event kinds in the ring buffer: a drop, or the policy verdict for a new flow.
#define SCL_EVENT_DROP 1
#define SCL_EVENT_VERDICT 2
#define SCL_EVENT_AUDIT 3 /* a new flow the audit verdict would treat otherwise: dropped vs let through */

#define SCL_DROP_POLICY_DENIED 1
#define SCL_DROP_PROXY_UNAVAILABLE 2
#define SCL_DROP_POLICY_DENYLIST 3
#define SCL_DROP_INVALID_SOURCE 4 /* a pod sent with an address that is not its own */
#define SCL_DROP_UNSUPPORTED_L3 5 /* an ethertype this datapath does not police */
#define SCL_DROP_VLAN 6           /* a VLAN tag (802.1Q, 802.1ad), in the data or already in skb->vlan_tci */
#define SCL_DROP_INVALID_PACKET 7 /* truncated, or headers that disagree */
#define SCL_DROP_UNKNOWN_FRAGMENT 8 /* a non-first fragment whose first fragment was not let through */
#define SCL_DROP_PROXY_REQUIRED 9 /* a peer's reply on a flow opened before its port became L7 */
#define SCL_DROP_INVALID_EXTENSION 10 /* more IPv6 extension headers than are walked, or a routing header
				       * with segments left (its real destination is not the one checked) */
#define SCL_DROP_FORBIDDEN_ICMP6 11 /* a router's ICMPv6 message from a pod, or an advertisement for an
				     * address that is not the pod's */

#define SCL_COUNTER_DROPPED 0
#define SCL_COUNTER_REDIRECTED 1
#define SCL_COUNTER_EVENTS_LOST 2
#define SCL_COUNTER_DIRECT_FLOWS 3 /* new flows between two pods of this node sent straight to the peer */
#define SCL_COUNTER_FLOWS_REDECIDED 4 /* tracked flows decided again after a policy change */
#define SCL_COUNTER_SOCKETS_PAIRED 5   /* sockets added to scl_sockets (socket acceleration) */
#define SCL_COUNTER_SOCKETS_UNPAIRED 6 /* sockets taken out of it: their data goes through the stack again */
#define SCL_COUNTER_MAX 8

// Settings the agent writes (scl_config, an array): index -> value.
// Allowed new flows are reported only while somebody watches (`monitor`); drops always are.
#define SCL_CONFIG_VERDICT_EVENTS 0
// Allowed flows between two pods of this node go from one veth to the other (bpf_redirect_neigh), past the
// node's IP stack and netfilter; 0: the node routes them like any forwarded packet.
#define SCL_CONFIG_DIRECT_ROUTING 1
// Bumped by the agent after each map change: a tracked flow decided at an older revision is decided again on
// its next packet, so an open connection follows the policy in force (denied: dropped; now L7: to the proxy).
#define SCL_CONFIG_POLICY_REVISION 2
// Conntrack lifetimes (Cilium's --bpf-ct-timeout-regular-* flags and defaults), in ticks of 2^30 ns (about
// 1.07 s): the program reads the clock with a shift, not a division, on every packet.
#define SCL_CONFIG_CT_TIMEOUT_TCP 3     /* established */
#define SCL_CONFIG_CT_TIMEOUT_TCP_SYN 4 /* opened, no reply yet */
#define SCL_CONFIG_CT_TIMEOUT_TCP_FIN 5 /* a FIN or RST seen */
#define SCL_CONFIG_CT_TIMEOUT_ANY 6     /* UDP, SCTP, ICMP, ... since the last packet */
// Socket acceleration (bpf/sockets.bpf.c): the cookie of the node's network namespace, where the proxy runs
// (written before its programs are attached), and whether new connections are accelerated (1) or none is (0).
#define SCL_CONFIG_NODE_NETNS 7
#define SCL_CONFIG_SOCKETS 8
#define SCL_CONFIG_MAX 16
#define SCL_CT_TICK_SHIFT 30

// What kind of interface the programs are on (scl_interfaces, by ifindex). A pod's veth: its packets must
// carry the pod's own address.
#define SCL_INTERFACE_POD 1

// LPM key bits before the port: endpoint_id, peer_identity, direction, protocol.
#define SCL_POLICY_FIXED_BITS 80
// An IPv4 address in the 16-byte form is IPv4-mapped (::ffff:a.b.c.d): its ipcache prefixes are 96 bits longer.
#define SCL_IPV4_MAPPED_BITS 96

// An address of either family, as IPv6 holds it (IPv4 mapped into ::ffff:0:0/96), in network order: one key
// layout for both families, so a policy is the same whatever family a packet has.
struct scl_addr {
	__be32 words[4];
};

struct scl_endpoint_key {
	struct scl_addr ip; /* a pod has an entry per address (IPv4, IPv6) with the same info */
};

struct scl_endpoint_info {
	u32 identity;
	u32 flags;
	u32 ifindex; /* the node side of the pod's veth; 0: unknown (no direct routing to it) */
	u32 id;      /* the pod's policy entries are keyed by it, shared by both its addresses */
};

struct scl_interface_info {
	u32 flags;           /* SCL_INTERFACE_* */
	__be32 ip4;          /* a pod's IPv4 address: the only IPv4 source its packets may carry; 0: none */
	struct scl_addr ip6; /* its IPv6 address: the only global IPv6 source; all zero: none */
};

struct scl_ipcache_key {
	u32 prefixlen;
	struct scl_addr ip;
};

struct scl_ipcache_value {
	u32 identity;
};

struct scl_policy_key {
	u32 prefixlen; /* SCL_POLICY_FIXED_BITS + the port's prefix bits */
	u32 endpoint_id;
	u32 peer_identity;
	u8 direction;
	u8 protocol; /* ICMPv6 is looked up as ICMP: policy's ICMP is either family's */
	__be16 port; /* network order, so a port range is a set of prefixes */
};

struct scl_policy_entry {
	u8 action;
	u8 audit_action; /* read only where the pod's direction is audited; SCL_ACTION_NONE: default deny */
	u16 proxy_port;
	u32 hit_index; /* its rule items' counters in scl_hits (one index per set of rule items) */
};

// Conntrack entry flags.
#define SCL_CT_FROM_NODE 1  /* started by the node itself (to_pod): always allowed, never re-decided */
#define SCL_CT_SEEN_REPLY 2 /* a reply went back: established */
#define SCL_CT_CLOSING 4    /* a FIN or RST went by */
#define SCL_CT_FROM_PROXY 8 /* Envoy's egress upstream connection, from the pod's address: replies go to Envoy */

// A tracked flow, keyed by the tuple of the packet that opened it (and passed policy in that direction): what
// its packets get, the policy revision that decided it, when it expires, and for a flow between two pods of
// this node routed directly, the interfaces its packets and its replies leave by.
struct scl_ct_entry {
	u8 action; /* SCL_ACTION_ALLOW or SCL_ACTION_REDIRECT */
	u8 flags;  /* SCL_CT_* */
	u16 proxy_port;
	u32 ifindex;       /* 0: the node's stack routes the flow */
	u32 reply_ifindex; /* 0: the node's stack routes the replies */
	u32 revision;      /* SCL_CONFIG_POLICY_REVISION when the verdict was decided */
	u32 expires;       /* CLOCK_MONOTONIC >> SCL_CT_TICK_SHIFT */
	u32 pad;
};

// The ports of a fragmented datagram, recorded from its first fragment (the only one that carries them).
struct scl_fragment_key {
	struct scl_addr saddr;
	struct scl_addr daddr;
	__be32 id; /* IPv4's 16-bit id in the low-addressed half, or IPv6's 32-bit one */
	u8 protocol;
	u8 pad[3];
};

struct scl_fragment_ports {
	__be16 sport;
	__be16 dport;
	u8 protocol; /* the upper-layer protocol (an IPv6 fragment header may be followed by more headers) */
	u8 pad[3];
};

struct scl_ct_key {
	struct scl_addr saddr;
	struct scl_addr daddr;
	__be16 sport;
	__be16 dport;
	u8 protocol;
	u8 pad[3];
};

// A TCP socket of this node in scl_sockets (socket acceleration): its own ends (IPv4 mapped, as in scl_addr;
// ports in network order) and whether it lives in the node's network namespace (the proxy's side) or a pod's.
// Its peer is the socket with the ends swapped on the other side.
struct scl_socket_key {
	struct scl_addr local;
	struct scl_addr remote;
	__be16 local_port;
	__be16 remote_port;
	u8 node_side;
	u8 pad[3];
};

struct scl_drop_event {
	u64 timestamp_ns;
	struct scl_addr saddr;
	struct scl_addr daddr;
	__be16 sport;
	__be16 dport;
	u32 source_identity;
	u32 destination_identity;
	u32 ifindex;
	u8 protocol;
	u8 reason;
	u8 tcp_flags;
	u8 direction;
	u8 kind;   /* SCL_EVENT_* */
	u8 action; /* for a verdict: SCL_ACTION_ALLOW or SCL_ACTION_REDIRECT */
	__be16 ethertype; /* the frame's: ETH_P_IP, ETH_P_IPV6, or what was dropped before parsing */
	/* For an audit event, the audit verdict; the enforced one is in reason (a drop) or action. */
	u8 audit_reason; /* 0: let through; else SCL_DROP_* */
	u8 audit_action; /* let through: SCL_ACTION_ALLOW or SCL_ACTION_REDIRECT */
	u8 audit_direction;
	u8 pad;
};

// The maps every program shares, pinned by the agent (redirect/compile_programs.py loads the programs against
// the pins it finds, or pins these if there are none): they outlive the agent and every build of the programs.
BPF_TABLE("hash", struct scl_endpoint_key, struct scl_endpoint_info, scl_endpoints, SCL_ENDPOINTS_MAX);
BPF_TABLE("hash", u32, struct scl_interface_info, scl_interfaces, SCL_ENDPOINTS_MAX);
BPF_F_TABLE("lpm_trie", struct scl_ipcache_key, struct scl_ipcache_value, scl_ipcache, SCL_IPCACHE_MAX,
	    BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct scl_policy_key, struct scl_policy_entry, scl_policy, SCL_POLICY_MAX,
	    BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct scl_ct_key, struct scl_ct_entry, scl_conntrack, SCL_CONNTRACK_MAX);
BPF_TABLE("lru_hash", struct scl_fragment_key, struct scl_fragment_ports, scl_fragments, SCL_FRAGMENTS_MAX);
BPF_TABLE("array", u32, u64, scl_counters, SCL_COUNTER_MAX);
BPF_TABLE("array", u32, u64, scl_hits, 2 * SCL_HITS_MAX);
BPF_TABLE("array", u32, u64, scl_config, SCL_CONFIG_MAX);
