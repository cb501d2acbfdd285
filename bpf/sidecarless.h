// SPDX-License-Identifier: Apache-2.0
// Map layouts, marks and reasons of the sidecarless datapath. The agent reads these layouts through BCC's
// table types, so this header is the one definition.
#pragma once

#ifndef SCL_PIN_DIR
#error "SCL_PIN_DIR must name the bpffs directory for pinned maps"
#endif

#define SCL_ENDPOINTS_MAX 4096
#define SCL_IPCACHE_MAX 65536
#define SCL_POLICY_MAX 262144
#define SCL_CONNTRACK_MAX 65536
#define SCL_EVENT_PAGES 64 /* 256 KiB ring buffer */

// Reserved identities (Cilium's numbers). SCL_IDENTITY_ANY in a policy key matches every peer.
#define SCL_IDENTITY_ANY 0
#define SCL_IDENTITY_HOST 1
#define SCL_IDENTITY_WORLD 2

// skb->mark for a flow handed to the proxy: 0x200 in the 0xf00 nibble (the ip rule and the nftables TPROXY
// rules match it), the proxy port in the upper 16 bits (an nftables rule per proxy port reads it).
#define SCL_MARK_TO_PROXY 0x200
// skb->mark for every other packet from_pod let through: to_pod, later on the same node, then knows the packet
// was decided and skips its own lookups. Crossing into a pod's namespace clears the mark.
#define SCL_MARK_DECIDED 0x100
#define SCL_MARK_MAGIC_MASK 0xf00

#define SCL_ENDPOINT_ENFORCE_INGRESS 1
#define SCL_ENDPOINT_ENFORCE_EGRESS 2

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

#define SCL_DROP_POLICY_DENIED 1
#define SCL_DROP_PROXY_UNAVAILABLE 2
#define SCL_DROP_POLICY_DENYLIST 3

#define SCL_COUNTER_DROPPED 0
#define SCL_COUNTER_REDIRECTED 1
#define SCL_COUNTER_EVENTS_LOST 2
#define SCL_COUNTER_DIRECT_FLOWS 3 /* new flows between two pods of this node sent straight to the peer */
#define SCL_COUNTER_MAX 4

// Settings the agent writes (scl_config, an array): index -> value.
// Allowed new flows are reported only while somebody watches (`monitor`); drops always are.
#define SCL_CONFIG_VERDICT_EVENTS 0
// Allowed flows between two pods of this node go from one veth to the other (bpf_redirect_neigh), past the
// node's IP stack and netfilter; 0: the node routes them like any forwarded packet.
#define SCL_CONFIG_DIRECT_ROUTING 1
#define SCL_CONFIG_MAX 4

// LPM key bits before the port: endpoint_ip, peer_identity, direction, protocol.
#define SCL_POLICY_FIXED_BITS 80

struct scl_endpoint_key {
	__be32 ip;
};

struct scl_endpoint_info {
	u32 identity;
	u32 flags;
	u32 ifindex; /* the node side of the pod's veth; 0: unknown (no direct routing to it) */
};

struct scl_ipcache_key {
	u32 prefixlen;
	__be32 ip;
};

struct scl_ipcache_value {
	u32 identity;
};

struct scl_policy_key {
	u32 prefixlen; /* SCL_POLICY_FIXED_BITS + the port's prefix bits */
	__be32 endpoint_ip;
	u32 peer_identity;
	u8 direction;
	u8 protocol;
	__be16 port; /* network order, so a port range is a set of prefixes */
};

struct scl_policy_entry {
	u8 action;
	u8 pad;
	u16 proxy_port;
};

// A tracked flow: what its packets get, and for a flow between two pods of this node routed directly, the
// interfaces its packets and its replies leave by.
struct scl_ct_entry {
	u8 action; /* SCL_ACTION_ALLOW or SCL_ACTION_REDIRECT */
	u8 pad;
	u16 proxy_port;
	u32 ifindex;       /* 0: the node's stack routes the flow */
	u32 reply_ifindex; /* 0: the node's stack routes the replies */
};

struct scl_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	u8 protocol;
	u8 pad[3];
};

struct scl_drop_event {
	u64 timestamp_ns;
	__be32 saddr;
	__be32 daddr;
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
	u16 pad;
};
