// SPDX-License-Identifier: Apache-2.0
// TC programs on the node side of each pod's veth (and on the node's other interfaces).
//
// from_pod (TC ingress: every packet a pod sends, or that enters the node from outside) decides flows: the
// source pod's egress policy and the destination pod's ingress policy, both by identity, in the kernel.
// A flow on an L7-governed port is marked for the proxy; an nftables TPROXY rule in the node namespace
// delivers it to Envoy's transparent listener. Everything else stays in the kernel: an allowed flow between two
// pods of this node goes from one veth straight to the other (bpf_redirect_neigh), past the node's IP stack.
//
// A pod is assumed hostile (it has CAP_NET_RAW): only IPv4, IPv6 and ARP frames pass, untagged, with the ethertype
// the kernel agrees with; a packet must carry its pod's own source address; conntrack state is created only by
// a packet that passed policy in its own direction, expires, and is decided again after every policy change.
//
// to_pod (TC egress: every packet entering a pod, or leaving the node by its other interfaces) records flows
// the node itself starts into a pod (Envoy's upstream connections, probes), which policy always allows, and
// Envoy's egress upstream connections wherever they leave, so the replies are known as replies. Packets
// from_pod already let through carry its mark and pass at once: most packets cost to_pod no lookup.
//
// Compiled by BCC once per source, flags and kernel (redirect/compile_programs.py), loaded against the maps
// pinned in bpffs, so they outlive the agent and are shared with the next build.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_arp.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

// SCTP's common header starts with the ports, as TCP's and UDP's do.
struct scl_ports {
	__be16 source;
	__be16 dest;
};

// ARP for IPv4 over Ethernet, the only kind a pod needs.
struct scl_arp {
	__be16 hardware;
	__be16 protocol;
	u8 hardware_length;
	u8 protocol_length;
	__be16 operation;
	u8 sender_mac[6];
	__be32 sender_ip;
	u8 target_mac[6];
	__be32 target_ip;
} __attribute__((packed));

// The IPv6 fragment header (RFC 8200 4.5).
struct scl_ipv6_fragment {
	u8 nexthdr;
	u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3, and the more-fragments flag */
	__be32 identification;
};

#include "sidecarless.h"

BPF_RINGBUF_OUTPUT(scl_events, SCL_EVENT_PAGES);

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_RST 0x04
#define IP_MORE_FRAGMENTS 0x2000
#define IP_FRAGMENT_OFFSET 0x1fff
#define IPV6_FRAGMENT_OFFSET 0xfff8
#define IPV6_MORE_FRAGMENTS 0x0001
// IPv6 extension headers walked before the upper-layer header; a packet with more is dropped (Cilium's limit).
#define SCL_IPV6_EXTENSIONS_MAX 6

// ICMPv6 types a pod sends on its link (RFC 4861 neighbour discovery, RFC 3810 MLD).
#define ICMP6_MLD_QUERY 130
#define ICMP6_MLD_REPORT 131
#define ICMP6_MLD_DONE 132
#define ICMP6_ROUTER_SOLICITATION 133
#define ICMP6_ROUTER_ADVERTISEMENT 134
#define ICMP6_NEIGHBOUR_SOLICITATION 135
#define ICMP6_NEIGHBOUR_ADVERTISEMENT 136
#define ICMP6_REDIRECT 137
#define ICMP6_MLD2_REPORT 143

// What parse() found: an IP packet (of either family), an ARP packet, or else a drop reason (SCL_DROP_*).
#define SCL_PARSED_IP 0
#define SCL_PARSED_ARP 100

struct scl_packet {
	struct scl_ct_key flow;
	struct scl_ct_key inner;     /* an ICMP error: the flow of the packet it is about, as sent */
	struct scl_addr nd_target;   /* a neighbour advertisement: the address it announces */
	__be32 fragment_id;
	__be32 arp_sender;
	__be16 ethertype;
	u8 tcp_flags;
	u8 is_syn;
	u8 first_fragment;    /* more fragments follow: their ports are recorded once this one passes */
	u8 fragment_protocol; /* the fragment key's protocol: IPv4's, or the IPv6 fragment header's next header */
	u8 icmp_type;
	u8 link_scope; /* ICMPv6 neighbour discovery or MLD to a link-scope address: for the node, never routed */
	u8 icmp_error; /* an ICMP error carrying the start of the packet it is about */
	u8 pad[3];
};

// A policy decision for one flow.
struct scl_verdict {
	struct scl_ct_entry entry; /* what the flow's packets get */
	u32 source_identity;
	u32 destination_identity;
	u8 reason;    /* 0: allowed; else SCL_DROP_* */
	u8 direction; /* the direction that decided */
	u8 pod_flow;  /* from or to a pod of this node (verdict events report those) */
	u8 audited;   /* an audited policy changes a verdict of either pod: the audit verdict is below */
	u8 audit_reason;
	u8 audit_action;
	u8 audit_direction;
	u32 egress_hit; /* the deciding entries' hit indexes (0: none) */
	u32 ingress_hit;
};

// Map methods (.lookup, ...) are rewritten by BCC in the compiled file only, not in a header: these live here.
static __always_inline void count(u32 counter)
{
	u64 *value = scl_counters.lookup(&counter);
	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline u64 config_or(u32 index, u64 fallback)
{
	u64 *value = scl_config.lookup(&index);
	return value && *value ? *value : fallback;
}

// A new flow counted on the rule items of an entry that decided it (`policy hits`).
static __always_inline void count_hit(u32 hit_index, int denied)
{
	u32 slot = 2 * hit_index + (denied ? 1 : 0);
	u64 *value;

	if (!hit_index)
		return;
	value = scl_hits.lookup(&slot);
	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline void addr_from_ipv4(struct scl_addr *addr, __be32 ip)
{
	addr->words[0] = 0;
	addr->words[1] = 0;
	addr->words[2] = bpf_htonl(0xffff);
	addr->words[3] = ip;
}

// ::ffff:0:0/96, where the 16-byte form holds an IPv4 address.
static __always_inline int addr_is_ipv4(const struct scl_addr *addr)
{
	return !addr->words[0] && !addr->words[1] && addr->words[2] == bpf_htonl(0xffff);
}

static __always_inline int addr_equal(const struct scl_addr *a, const struct scl_addr *b)
{
	return a->words[0] == b->words[0] && a->words[1] == b->words[1] && a->words[2] == b->words[2] &&
	       a->words[3] == b->words[3];
}

static __always_inline int addr_is_zero(const struct scl_addr *addr)
{
	return !(addr->words[0] | addr->words[1] | addr->words[2] | addr->words[3]);
}

// fe80::/10
static __always_inline int addr_is_link_local(const struct scl_addr *addr)
{
	return (bpf_ntohl(addr->words[0]) & 0xffc00000) == 0xfe800000;
}

// A destination that never leaves the link: link-local unicast, or multicast of link scope (ff02::/16).
static __always_inline int addr_is_link_scope(const struct scl_addr *addr)
{
	return addr_is_link_local(addr) || (bpf_ntohl(addr->words[0]) >> 16) == 0xff02;
}

static __always_inline int has_ports(u8 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP || protocol == IPPROTO_SCTP;
}

static __always_inline int is_icmp_error(u8 protocol, u8 type)
{
	if (protocol == IPPROTO_ICMP)
		return type == 3 || type == 11 || type == 12; /* unreachable, time exceeded, parameter problem */
	return protocol == IPPROTO_ICMPV6 && type >= 1 && type <= 4; /* the same, and packet too big */
}

// The start of the packet an ICMP error carries (at `offset`): its addresses, protocol and ports, with which
// the error is matched to a tracked flow. Extension headers in it are not walked (no ports then).
static __always_inline int parse_icmp_inner(struct __sk_buff *skb, struct scl_packet *packet, u32 offset)
{
	struct scl_ports ports = {};
	u32 ports_offset;

	if (packet->ethertype == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, offset, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5)
			return SCL_DROP_INVALID_PACKET;
		addr_from_ipv4(&packet->inner.saddr, ip.saddr);
		addr_from_ipv4(&packet->inner.daddr, ip.daddr);
		packet->inner.protocol = ip.protocol;
		ports_offset = offset + ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, offset, &ip6, sizeof(ip6)) || ip6.version != 6)
			return SCL_DROP_INVALID_PACKET;
		__builtin_memcpy(&packet->inner.saddr, &ip6.saddr, sizeof(struct scl_addr));
		__builtin_memcpy(&packet->inner.daddr, &ip6.daddr, sizeof(struct scl_addr));
		packet->inner.protocol = ip6.nexthdr;
		ports_offset = offset + sizeof(ip6);
	}
	if (has_ports(packet->inner.protocol) && !bpf_skb_load_bytes(skb, ports_offset, &ports, sizeof(ports))) {
		packet->inner.sport = ports.source;
		packet->inner.dport = ports.dest;
	}
	packet->icmp_error = 1;
	return SCL_PARSED_IP;
}

// The upper-layer header at `offset`: ports, TCP flags, ICMP type.
static __always_inline int parse_l4(struct __sk_buff *skb, struct scl_packet *packet, u32 offset)
{
	u8 protocol = packet->flow.protocol;

	if (protocol == IPPROTO_TCP) {
		struct tcphdr tcp;
		if (bpf_skb_load_bytes(skb, offset, &tcp, sizeof(tcp)))
			return SCL_DROP_INVALID_PACKET;
		packet->flow.sport = tcp.source;
		packet->flow.dport = tcp.dest;
		packet->tcp_flags = ((u8 *)&tcp)[13];
		packet->is_syn = tcp.syn && !tcp.ack;
	} else if (protocol == IPPROTO_UDP || protocol == IPPROTO_SCTP) {
		struct scl_ports ports;
		if (bpf_skb_load_bytes(skb, offset, &ports, sizeof(ports)))
			return SCL_DROP_INVALID_PACKET;
		packet->flow.sport = ports.source;
		packet->flow.dport = ports.dest;
	} else if (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6) {
		u8 type;
		if (bpf_skb_load_bytes(skb, offset, &type, sizeof(type)))
			return SCL_DROP_INVALID_PACKET;
		packet->icmp_type = type;
		if (is_icmp_error(protocol, type))
			return parse_icmp_inner(skb, packet, offset + 8);
		if (protocol == IPPROTO_ICMPV6 && addr_is_link_scope(&packet->flow.daddr) &&
		    ((type >= ICMP6_MLD_QUERY && type <= ICMP6_REDIRECT) || type == ICMP6_MLD2_REPORT)) {
			packet->link_scope = 1;
			if (type == ICMP6_NEIGHBOUR_ADVERTISEMENT &&
			    bpf_skb_load_bytes(skb, offset + 8, &packet->nd_target, sizeof(packet->nd_target)))
				return SCL_DROP_INVALID_PACKET;
		}
	}
	return SCL_PARSED_IP;
}

// A later fragment carries no upper-layer header: its ports are those its first fragment was let through with.
static __always_inline int parse_later_fragment(struct scl_packet *packet)
{
	struct scl_fragment_key key = {};
	struct scl_fragment_ports *ports;

	key.saddr = packet->flow.saddr;
	key.daddr = packet->flow.daddr;
	key.id = packet->fragment_id;
	key.protocol = packet->fragment_protocol;
	ports = scl_fragments.lookup(&key);
	if (!ports)
		return SCL_DROP_UNKNOWN_FRAGMENT;
	packet->flow.sport = ports->sport;
	packet->flow.dport = ports->dport;
	packet->flow.protocol = ports->protocol;
	return SCL_PARSED_IP;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct scl_packet *packet, struct iphdr *ip)
{
	u16 fragment;

	if (ip->version != 4 || ip->ihl < 5)
		return SCL_DROP_INVALID_PACKET;
	addr_from_ipv4(&packet->flow.saddr, ip->saddr);
	addr_from_ipv4(&packet->flow.daddr, ip->daddr);
	packet->flow.protocol = ip->protocol;
	packet->fragment_protocol = ip->protocol;
	packet->fragment_id = ip->id;
	fragment = bpf_ntohs(ip->frag_off);
	if (fragment & IP_FRAGMENT_OFFSET)
		return parse_later_fragment(packet);
	packet->first_fragment = (fragment & IP_MORE_FRAGMENTS) != 0;
	return parse_l4(skb, packet, sizeof(struct ethhdr) + ip->ihl * 4);
}

// The known extension headers are skipped (a fragment header is read); what follows them is the upper-layer
// protocol, whatever its number (policy then decides on it: an unknown protocol has no allow entry).
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct scl_packet *packet, struct ipv6hdr *ip6)
{
	u32 offset = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	u8 next = ip6->nexthdr;
	int i;

	if (ip6->version != 6)
		return SCL_DROP_INVALID_PACKET;
	__builtin_memcpy(&packet->flow.saddr, &ip6->saddr, sizeof(struct scl_addr));
	__builtin_memcpy(&packet->flow.daddr, &ip6->daddr, sizeof(struct scl_addr));
#pragma unroll
	for (i = 0; i < SCL_IPV6_EXTENSIONS_MAX; i++) {
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_DSTOPTS || next == IPPROTO_ROUTING ||
		    next == IPPROTO_AH) {
			u8 header[4]; /* next header, length, and for routing: type, segments left */
			if (bpf_skb_load_bytes(skb, offset, header, sizeof(header)))
				return SCL_DROP_INVALID_PACKET;
			if (next == IPPROTO_ROUTING && header[3])
				return SCL_DROP_INVALID_EXTENSION;
			offset += next == IPPROTO_AH ? (header[1] + 2) * 4 : (header[1] + 1) * 8;
			next = header[0];
		} else if (next == IPPROTO_FRAGMENT) {
			struct scl_ipv6_fragment fragment;
			u16 fragment_offset;
			if (bpf_skb_load_bytes(skb, offset, &fragment, sizeof(fragment)))
				return SCL_DROP_INVALID_PACKET;
			packet->fragment_id = fragment.identification;
			packet->fragment_protocol = fragment.nexthdr;
			fragment_offset = bpf_ntohs(fragment.frag_off);
			if (fragment_offset & IPV6_FRAGMENT_OFFSET) {
				packet->flow.protocol = fragment.nexthdr;
				return parse_later_fragment(packet);
			}
			packet->first_fragment = (fragment_offset & IPV6_MORE_FRAGMENTS) != 0;
			offset += sizeof(fragment);
			next = fragment.nexthdr;
		} else {
			packet->flow.protocol = next;
			return parse_l4(skb, packet, offset);
		}
	}
	return SCL_DROP_INVALID_EXTENSION;
}

// Decide on what this program sees, never on what the stack may later make of it: a VLAN tag (in the data, or
// moved into skb->vlan_tci before TC), or an ethertype that disagrees with skb->protocol, is dropped, since the
// stack could strip the tag and deliver what is behind it. Only IPv4, IPv6 and ARP pass.
static __always_inline int parse(struct __sk_buff *skb, struct scl_packet *packet)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return SCL_DROP_INVALID_PACKET;
	packet->ethertype = eth->h_proto;
	if (skb->vlan_present || eth->h_proto == bpf_htons(ETH_P_8021Q) || eth->h_proto == bpf_htons(ETH_P_8021AD))
		return SCL_DROP_VLAN;
	if (eth->h_proto != skb->protocol)
		return SCL_DROP_INVALID_PACKET;
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct scl_arp *arp = (void *)(eth + 1);
		if ((void *)(arp + 1) > data_end)
			return SCL_DROP_INVALID_PACKET;
		if (arp->hardware != bpf_htons(ARPHRD_ETHER) || arp->protocol != bpf_htons(ETH_P_IP) ||
		    arp->hardware_length != 6 || arp->protocol_length != 4)
			return SCL_DROP_INVALID_PACKET;
		packet->arp_sender = arp->sender_ip;
		return SCL_PARSED_ARP;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return SCL_DROP_INVALID_PACKET;
		return parse_ipv4(skb, packet, ip);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return SCL_DROP_INVALID_PACKET;
		return parse_ipv6(skb, packet, ip6);
	}
	return SCL_DROP_UNSUPPORTED_L3;
}

static __always_inline void reverse_of(struct scl_ct_key *flow, struct scl_ct_key *reverse)
{
	reverse->saddr = flow->daddr;
	reverse->daddr = flow->saddr;
	reverse->sport = flow->dport;
	reverse->dport = flow->sport;
	reverse->protocol = flow->protocol;
}

static __always_inline u32 identity_of(struct scl_addr *ip, struct scl_endpoint_info *endpoint)
{
	struct scl_ipcache_key key = {.prefixlen = 128};
	struct scl_ipcache_value *value;

	if (endpoint)
		return endpoint->identity;
	key.ip = *ip;
	value = scl_ipcache.lookup(&key);
	if (value)
		return value->identity;
	return addr_is_ipv4(ip) ? SCL_IDENTITY_WORLD : SCL_IDENTITY_WORLD_IPV6;
}

// The policy entry for traffic of endpoint `endpoint_id` in `direction` with `peer`: the peer's own entry (the
// longest port prefix), else the any-peer entry. Compile makes the peer's entry include the any-peer rules.
static __always_inline struct scl_policy_entry *lookup_policy(u32 endpoint_id, u8 direction, u32 peer,
							     u8 protocol, __be16 port)
{
	struct scl_policy_key key = {};
	struct scl_policy_entry *entry;

	key.prefixlen = SCL_POLICY_FIXED_BITS + 16;
	key.endpoint_id = endpoint_id;
	key.peer_identity = peer;
	key.direction = direction;
	key.protocol = protocol == IPPROTO_ICMPV6 ? IPPROTO_ICMP : protocol;
	key.port = port;
	entry = scl_policy.lookup(&key);
	if (entry)
		return entry;
	key.peer_identity = SCL_IDENTITY_ANY;
	return scl_policy.lookup(&key);
}

static __always_inline struct scl_drop_event *notify(struct __sk_buff *skb, struct scl_packet *packet,
						     u32 source_identity, u32 destination_identity, u8 direction,
						     u8 kind, u8 reason, u8 action)
{
	struct scl_drop_event *event = scl_events.ringbuf_reserve(sizeof(*event));

	if (!event) {
		count(SCL_COUNTER_EVENTS_LOST);
		return NULL;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	event->saddr = packet->flow.saddr;
	event->daddr = packet->flow.daddr;
	event->sport = packet->flow.sport;
	event->dport = packet->flow.dport;
	event->source_identity = source_identity;
	event->destination_identity = destination_identity;
	event->ifindex = skb->ifindex;
	event->protocol = packet->flow.protocol;
	event->reason = reason;
	event->tcp_flags = packet->tcp_flags;
	event->direction = direction;
	event->kind = kind;
	event->action = action;
	event->ethertype = packet->ethertype;
	event->audit_reason = 0;
	event->audit_action = 0;
	event->audit_direction = 0;
	event->pad = 0;
	if (kind != SCL_EVENT_AUDIT)
		scl_events.ringbuf_submit(event, 0);
	return event; // an audit event: the caller fills in the audit verdict and submits it
}

// A new flow's audit verdict where it differs from the enforced one in what matters to the flow: dropped, or
// let through (a redirect the audit verdict wants is checked by Envoy's shadow rules, not here). Always sent:
// audit mode is for a while and for the pods an audited policy selects, and its events are counted.
static __always_inline void notify_audit(struct __sk_buff *skb, struct scl_packet *packet, struct scl_verdict *verdict)
{
	struct scl_drop_event *event;

	if (!verdict->audited || verdict->reason == SCL_DROP_PROXY_UNAVAILABLE ||
	    (verdict->reason != 0) == (verdict->audit_reason != 0))
		return;
	event = notify(skb, packet, verdict->source_identity, verdict->destination_identity, verdict->direction,
		       SCL_EVENT_AUDIT, verdict->reason, verdict->reason ? 0 : verdict->entry.action);
	if (!event)
		return;
	event->audit_reason = verdict->audit_reason;
	event->audit_action = verdict->audit_action;
	event->audit_direction = verdict->audit_direction;
	scl_events.ringbuf_submit(event, 0);
}

static __always_inline int drop(struct __sk_buff *skb, struct scl_packet *packet, u32 source_identity,
				u32 destination_identity, u8 direction, u8 reason)
{
	count(SCL_COUNTER_DROPPED);
	notify(skb, packet, source_identity, destination_identity, direction, SCL_EVENT_DROP, reason, 0);
	return TC_ACT_SHOT;
}

// The action of one direction: the entry's, or what the direction does without one; and in `audit`, what the
// audit verdict does (the same where no audited policy changes this direction). Notes in `verdict` that a pod of
// this node is an end of the flow, and whether an audited policy changes its verdicts.
static __always_inline u8 decide(struct scl_endpoint_info *endpoint, u32 enforce_flag, u8 direction, u32 peer,
				 struct scl_ct_key *flow, u16 *proxy_port, u8 *audit, u32 *hit, struct scl_verdict *verdict)
{
	struct scl_policy_entry *entry;
	u8 action;
	int audit_on;

	*audit = SCL_ACTION_ALLOW;
	if (!endpoint)
		return SCL_ACTION_ALLOW; // not a pod of this node: its own node enforces its policy
	verdict->pod_flow = 1;
	audit_on = endpoint->flags & (enforce_flag << SCL_ENDPOINT_AUDIT_SHIFT);
	if (audit_on)
		verdict->audited = 1;
	entry = lookup_policy(endpoint->id, direction, peer, flow->protocol, flow->dport);
	if (!entry) {
		action = (endpoint->flags & enforce_flag) ? SCL_ACTION_NONE : SCL_ACTION_ALLOW;
		*audit = action;
		if (audit_on)
			*audit = (endpoint->flags & (enforce_flag << SCL_ENDPOINT_AUDIT_ENFORCE_SHIFT)) ? SCL_ACTION_NONE
											 : SCL_ACTION_ALLOW;
		return action;
	}
	*proxy_port = entry->proxy_port;
	*hit = entry->hit_index;
	// Both fields read before choosing: `cond ? entry->a : entry->b` compiles to pointer arithmetic on a map
	// value, which the verifier refuses without CAP_PERFMON (the DaemonSet's agent has NET_ADMIN and BPF).
	action = entry->action;
	*audit = entry->audit_action;
	if (!audit_on)
		*audit = action;
	return action;
}

// The audit verdict of a flow from the audit actions of both directions, in the order evaluate decides.
static __always_inline void audit_verdict(u8 egress, u8 ingress, struct scl_verdict *verdict)
{
	verdict->audit_direction = SCL_DIRECTION_INGRESS;
	if (egress == SCL_ACTION_DENY || ingress == SCL_ACTION_DENY) {
		verdict->audit_reason = SCL_DROP_POLICY_DENYLIST;
		verdict->audit_direction = egress == SCL_ACTION_DENY ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS;
	} else if (egress == SCL_ACTION_NONE || ingress == SCL_ACTION_NONE) {
		verdict->audit_reason = SCL_DROP_POLICY_DENIED;
		verdict->audit_direction = egress == SCL_ACTION_NONE ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS;
	} else if (egress == SCL_ACTION_REDIRECT || ingress == SCL_ACTION_REDIRECT) {
		verdict->audit_action = SCL_ACTION_REDIRECT;
		verdict->audit_direction = egress == SCL_ACTION_REDIRECT ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS;
	} else {
		verdict->audit_action = SCL_ACTION_ALLOW;
	}
}

// The policy verdict for the flow opened by a packet with tuple `flow`.
static __always_inline void evaluate(struct scl_ct_key *flow, struct scl_verdict *verdict)
{
	struct scl_endpoint_key endpoint_key = {};
	struct scl_endpoint_info *source, *destination;
	u16 egress_proxy = 0, ingress_proxy = 0;
	u8 egress, ingress, egress_audit, ingress_audit;

	endpoint_key.ip = flow->saddr;
	source = scl_endpoints.lookup(&endpoint_key);
	endpoint_key.ip = flow->daddr;
	destination = scl_endpoints.lookup(&endpoint_key);
	verdict->source_identity = identity_of(&flow->saddr, source);
	verdict->destination_identity = identity_of(&flow->daddr, destination);

	egress = decide(source, SCL_ENDPOINT_ENFORCE_EGRESS, SCL_DIRECTION_EGRESS, verdict->destination_identity,
			flow, &egress_proxy, &egress_audit, &verdict->egress_hit, verdict);
	ingress = decide(destination, SCL_ENDPOINT_ENFORCE_INGRESS, SCL_DIRECTION_INGRESS, verdict->source_identity,
			 flow, &ingress_proxy, &ingress_audit, &verdict->ingress_hit, verdict);
	if (verdict->audited)
		audit_verdict(egress_audit, ingress_audit, verdict);

	verdict->direction = SCL_DIRECTION_INGRESS;
	if (egress == SCL_ACTION_DENY || ingress == SCL_ACTION_DENY) {
		verdict->reason = SCL_DROP_POLICY_DENYLIST;
		verdict->direction = egress == SCL_ACTION_DENY ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS;
		return;
	}
	if (egress == SCL_ACTION_NONE || ingress == SCL_ACTION_NONE) {
		verdict->reason = SCL_DROP_POLICY_DENIED;
		verdict->direction = egress == SCL_ACTION_NONE ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS;
		return;
	}
	if (egress == SCL_ACTION_PROXY_UNAVAILABLE || ingress == SCL_ACTION_PROXY_UNAVAILABLE) {
		verdict->reason = SCL_DROP_PROXY_UNAVAILABLE;
		verdict->direction = egress == SCL_ACTION_PROXY_UNAVAILABLE ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS;
		return;
	}
	verdict->entry.action = SCL_ACTION_ALLOW;
	// Egress L7 first: the egress listener checks the destination's ingress L7 rules too, so a flow governed
	// by both is checked against both in one pass through Envoy.
	if (egress == SCL_ACTION_REDIRECT) {
		verdict->entry.action = SCL_ACTION_REDIRECT;
		verdict->entry.proxy_port = egress_proxy;
		verdict->direction = SCL_DIRECTION_EGRESS;
	} else if (ingress == SCL_ACTION_REDIRECT) {
		verdict->entry.action = SCL_ACTION_REDIRECT;
		verdict->entry.proxy_port = ingress_proxy;
	} else if (source && destination && source->ifindex && destination->ifindex &&
		   config_or(SCL_CONFIG_DIRECT_ROUTING, 0)) {
		// Both ends are pods of this node: the node's stack has nothing to add to this flow. Both directions
		// go direct, so netfilter sees neither (it would take the replies of a flow it never saw as invalid).
		verdict->entry.ifindex = destination->ifindex;
		verdict->entry.reply_ifindex = source->ifindex;
	}
}

// A new flow on the counters of the rules that decided it: both entries that let it through, or the deny entry
// that dropped it. A flow dropped for want of an entry (default deny) counts on no rule.
static __always_inline void count_hits(struct scl_verdict *verdict)
{
	if (!verdict->reason) {
		count_hit(verdict->egress_hit, 0);
		count_hit(verdict->ingress_hit, 0);
	} else if (verdict->reason == SCL_DROP_POLICY_DENYLIST) {
		count_hit(verdict->direction == SCL_DIRECTION_EGRESS ? verdict->egress_hit : verdict->ingress_hit, 1);
	}
}

// The kernel's helper takes (ifindex, params, plen, flags); BCC 0.26 declares it without plen, which would
// leave the flags argument unset.
static long (*redirect_neigh)(u32 ifindex, struct bpf_redir_neigh *params, int plen, u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

// Let an allowed packet through: to `ifindex` directly when the flow has one, else to the node's stack.
static __always_inline int pass(struct __sk_buff *skb, u32 ifindex)
{
	skb->mark = (skb->mark & ~SCL_MARK_MAGIC_MASK) | SCL_MARK_DECIDED;
	if (ifindex)
		return redirect_neigh(ifindex, NULL, 0, 0);
	return TC_ACT_OK;
}

static __always_inline int apply(struct __sk_buff *skb, struct scl_ct_entry *flow)
{
	if (flow->action == SCL_ACTION_REDIRECT) {
		skb->mark = SCL_MARK_TO_PROXY | ((u32)flow->proxy_port << 16);
		count(SCL_COUNTER_REDIRECTED);
		return TC_ACT_OK;
	}
	return pass(skb, flow->ifindex);
}

// Conntrack time: the coarse clock (CLOCK_MONOTONIC at tick resolution) shifted into ticks of about a second.
// Both halve what the precise clock and a division cost the established path, and lifetimes need no more.
static __always_inline u32 now_ticks(void)
{
	return bpf_ktime_get_coarse_ns() >> SCL_CT_TICK_SHIFT;
}

#define SCL_TICKS(seconds) ((((seconds) * 1000000000ULL) >> SCL_CT_TICK_SHIFT) + 1)

// How long a flow lives after its last packet, in ticks (the agent writes its flags; Cilium's defaults else).
static __always_inline u32 lifetime(u8 protocol, u8 flags)
{
	if (protocol != IPPROTO_TCP)
		return config_or(SCL_CONFIG_CT_TIMEOUT_ANY, SCL_TICKS(60));
	if (flags & SCL_CT_CLOSING)
		return config_or(SCL_CONFIG_CT_TIMEOUT_TCP_FIN, SCL_TICKS(10));
	if (flags & SCL_CT_SEEN_REPLY)
		return config_or(SCL_CONFIG_CT_TIMEOUT_TCP, SCL_TICKS(21600));
	return config_or(SCL_CONFIG_CT_TIMEOUT_TCP_SYN, SCL_TICKS(60));
}

// A packet of a tracked flow went by: note a reply or a close, and push the expiry out (at most one write a
// tick per flow).
static __always_inline void refresh(struct scl_ct_entry *entry, struct scl_packet *packet, int is_reply, u32 now)
{
	u8 flags = entry->flags;
	u32 expires;

	if (is_reply)
		flags |= SCL_CT_SEEN_REPLY;
	if (packet->flow.protocol == IPPROTO_TCP && (packet->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= SCL_CT_CLOSING;
	expires = now + lifetime(packet->flow.protocol, flags);
	if (flags != entry->flags)
		entry->flags = flags;
	if (expires != entry->expires)
		entry->expires = expires;
}

// The live entry of the flow this packet belongs to, in either direction (`*is_reply` says which); an expired
// entry is removed and counts as none. `opened` gets the tuple the flow was opened with.
static __always_inline struct scl_ct_entry *tracked_flow(struct scl_packet *packet, struct scl_ct_key *opened,
							 int *is_reply, u32 now)
{
	struct scl_ct_entry *entry = scl_conntrack.lookup(&packet->flow);

	*opened = packet->flow;
	*is_reply = 0;
	if (!entry) {
		reverse_of(&packet->flow, opened);
		entry = scl_conntrack.lookup(opened);
		*is_reply = 1;
	}
	if (entry && (s32)(entry->expires - now) < 0) {
		scl_conntrack.delete(opened);
		entry = NULL;
	}
	if (!entry) {
		*opened = packet->flow;
		*is_reply = 0;
	}
	return entry;
}

// A first fragment is let through: the later fragments of its datagram carry no ports, and get its flow's.
static __always_inline void remember_fragment(struct scl_packet *packet)
{
	struct scl_fragment_key key = {};
	struct scl_fragment_ports ports = {};

	if (!packet->first_fragment)
		return;
	key.saddr = packet->flow.saddr;
	key.daddr = packet->flow.daddr;
	key.id = packet->fragment_id;
	key.protocol = packet->fragment_protocol;
	ports.sport = packet->flow.sport;
	ports.dport = packet->flow.dport;
	ports.protocol = packet->flow.protocol;
	scl_fragments.update(&key, &ports);
}

// The source check: a pod's packets carry its own address (a spoofed source would borrow another pod's
// identity and prime conntrack); a pod's address never arrives from anywhere but its own veth. A pod without
// an address of a family (ip4 0, ip6 all zero) may send no source of that family.
static __always_inline int source_allowed(struct __sk_buff *skb, struct scl_addr *saddr, __be16 ethertype)
{
	u32 ifindex = skb->ifindex;
	struct scl_interface_info *interface = scl_interfaces.lookup(&ifindex);
	struct scl_endpoint_key key = {};
	struct scl_endpoint_info *owner;

	if (interface) {
		if (ethertype == bpf_htons(ETH_P_IPV6))
			return !addr_is_zero(&interface->ip6) && addr_equal(saddr, &interface->ip6);
		return interface->ip4 && saddr->words[3] == interface->ip4;
	}
	key.ip = *saddr;
	owner = scl_endpoints.lookup(&key);
	return !owner || !owner->ifindex || owner->ifindex == ifindex;
}

// Neighbour discovery and MLD on the pod's link, for the node only (never routed): from the pod's own address,
// its link-local address, or none (::, duplicate address detection). A pod is no router (no advertisements
// or redirects), and advertises only its own addresses.
static __always_inline int link_scope_reason(struct __sk_buff *skb, struct scl_packet *packet)
{
	u32 ifindex = skb->ifindex;
	struct scl_interface_info *interface = scl_interfaces.lookup(&ifindex);

	if (!interface)
		return 0; /* the node's own link to elsewhere: the node's neighbours */
	if (!addr_is_link_local(&packet->flow.saddr) && !addr_is_zero(&packet->flow.saddr) &&
	    !source_allowed(skb, &packet->flow.saddr, packet->ethertype))
		return SCL_DROP_INVALID_SOURCE;
	if (packet->icmp_type == ICMP6_ROUTER_ADVERTISEMENT || packet->icmp_type == ICMP6_REDIRECT)
		return SCL_DROP_FORBIDDEN_ICMP6;
	if (packet->icmp_type == ICMP6_NEIGHBOUR_ADVERTISEMENT && !addr_is_link_local(&packet->nd_target) &&
	    (addr_is_zero(&interface->ip6) || !addr_equal(&packet->nd_target, &interface->ip6)))
		return SCL_DROP_FORBIDDEN_ICMP6;
	return 0;
}

// An ICMP error about a tracked flow between the same two ends (the packet it carries went from the error's
// destination to its source) passes as part of that flow.
static __always_inline int error_of_tracked_flow(struct scl_packet *packet)
{
	struct scl_ct_key reverse = {};

	if (!packet->icmp_error || !addr_equal(&packet->inner.saddr, &packet->flow.daddr) ||
	    !addr_equal(&packet->inner.daddr, &packet->flow.saddr))
		return 0;
	if (scl_conntrack.lookup(&packet->inner))
		return 1;
	reverse_of(&packet->inner, &reverse);
	return scl_conntrack.lookup(&reverse) != NULL;
}

int from_pod(struct __sk_buff *skb)
{
	struct scl_packet packet = {};
	struct scl_ct_key opened = {};
	struct scl_verdict verdict = {};
	struct scl_ct_entry *tracked = NULL;
	int is_reply = 0;
	u32 now, revision;
	int parsed = parse(skb, &packet);

	if (parsed == SCL_PARSED_ARP) {
		// A pod may announce only its own address (0.0.0.0: an address probe).
		struct scl_addr sender = {};
		addr_from_ipv4(&sender, packet.arp_sender);
		if (packet.arp_sender && !source_allowed(skb, &sender, bpf_htons(ETH_P_IP)))
			return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, SCL_DROP_INVALID_SOURCE);
		return pass(skb, 0);
	}
	if (parsed != SCL_PARSED_IP)
		return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, parsed);
	if (packet.link_scope) {
		parsed = link_scope_reason(skb, &packet);
		if (parsed)
			return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, parsed);
		return pass(skb, 0);
	}
	if (!source_allowed(skb, &packet.flow.saddr, packet.ethertype))
		return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, SCL_DROP_INVALID_SOURCE);
	if (error_of_tracked_flow(&packet))
		return pass(skb, 0);

	now = now_ticks();
	revision = config_or(SCL_CONFIG_POLICY_REVISION, 0);
	// A SYN always decides anew: a reused 4-tuple must not inherit an old verdict.
	if (!packet.is_syn)
		tracked = tracked_flow(&packet, &opened, &is_reply, now);
	if (tracked) {
		if (!(tracked->flags & SCL_CT_FROM_NODE) && tracked->revision != revision) {
			// The policy changed since this flow was decided: an open flow gets the verdict in force.
			count(SCL_COUNTER_FLOWS_REDECIDED);
			evaluate(&opened, &verdict);
			if (verdict.reason) {
				scl_conntrack.delete(&opened);
				return drop(skb, &packet, verdict.source_identity, verdict.destination_identity,
					    verdict.direction, verdict.reason);
			}
			tracked->action = verdict.entry.action;
			tracked->proxy_port = verdict.entry.proxy_port;
			tracked->ifindex = verdict.entry.ifindex;
			tracked->reply_ifindex = verdict.entry.reply_ifindex;
			tracked->revision = revision;
		}
		refresh(tracked, &packet, is_reply, now);
		// The proxy answers for a redirected flow: a reply from the peer itself belongs to a connection
		// opened before its port became L7. Its client is reset on its next packet (the proxy's listener
		// does not know the connection) and reconnects through the proxy.
		if (is_reply && tracked->action == SCL_ACTION_REDIRECT)
			return drop(skb, &packet, 0, 0, SCL_DIRECTION_INGRESS, SCL_DROP_PROXY_REQUIRED);
		remember_fragment(&packet);
		if (!is_reply)
			return apply(skb, tracked);
		if (tracked->flags & SCL_CT_FROM_PROXY) {
			// Addressed to the pod, but it answers Envoy's socket: delivered locally (the proxy route; no
			// TPROXY port), where the established socket takes it.
			skb->mark = SCL_MARK_TO_PROXY;
			return TC_ACT_OK;
		}
		return pass(skb, tracked->reply_ifindex);
	}

	evaluate(&packet.flow, &verdict);
	if (packet.is_syn || packet.flow.protocol != IPPROTO_TCP) {
		notify_audit(skb, &packet, &verdict);
		count_hits(&verdict);
	}
	if (verdict.reason)
		return drop(skb, &packet, verdict.source_identity, verdict.destination_identity, verdict.direction,
			    verdict.reason);
	verdict.entry.revision = revision;
	refresh(&verdict.entry, &packet, 0, now);
	scl_conntrack.update(&packet.flow, &verdict.entry);
	remember_fragment(&packet);
	if (verdict.entry.ifindex)
		count(SCL_COUNTER_DIRECT_FLOWS);
	// A policy verdict for each new flow of a pod of this node, whether or not a policy decided it (as Hubble shows
	// every flow; `policy impact` replays them against other policies), while a monitor watches: an event per
	// new connection costs the agent more than the kernel spends on the flow.
	if (verdict.pod_flow && config_or(SCL_CONFIG_VERDICT_EVENTS, 0) &&
	    (packet.is_syn || packet.flow.protocol != IPPROTO_TCP))
		notify(skb, &packet, verdict.source_identity, verdict.destination_identity, verdict.direction,
		       SCL_EVENT_VERDICT, 0, verdict.entry.action);
	return apply(skb, &verdict.entry);
}

int to_pod(struct __sk_buff *skb)
{
	struct scl_packet packet = {};
	struct scl_ct_key opened = {};
	struct scl_ct_entry *tracked;
	struct scl_ct_entry from_node = {.action = SCL_ACTION_ALLOW, .flags = SCL_CT_FROM_NODE};
	int is_reply = 0;
	u32 now;
	int parsed;

	if ((skb->mark & SCL_MARK_MAGIC_MASK) == SCL_MARK_DECIDED)
		return TC_ACT_OK;
	parsed = parse(skb, &packet);
	if (parsed == SCL_PARSED_ARP || (parsed == SCL_PARSED_IP && (packet.link_scope || packet.icmp_error)))
		return TC_ACT_OK;
	if (parsed != SCL_PARSED_IP) {
		u32 ifindex = skb->ifindex;
		// Into a pod: only what it may send itself. Out of the node: the node's own business.
		if (!scl_interfaces.lookup(&ifindex))
			return TC_ACT_OK;
		return drop(skb, &packet, 0, 0, SCL_DIRECTION_INGRESS, parsed);
	}
	now = now_ticks();
	tracked = tracked_flow(&packet, &opened, &is_reply, now);
	remember_fragment(&packet);
	if (tracked) {
		refresh(tracked, &packet, is_reply, now);
		return TC_ACT_OK;
	}
	// Not seen by from_pod: from the node's stack. Recorded, so the replies are known as replies: Envoy's
	// egress upstream connections (from the pod's address) wherever they leave, and a flow the node itself
	// starts (from one of its addresses) into a pod. The node's own flows out of its other interfaces need no
	// entry (their replies are addressed to the node, which no pod policy governs) and would only crowd the
	// pods' flows out of the map. Anything else the stack delivers (the proxy answering for a flow whose entry
	// expired) passes without state.
	if ((skb->mark & SCL_MARK_MAGIC_MASK) == SCL_MARK_FROM_PROXY) {
		from_node.flags |= SCL_CT_FROM_PROXY;
	} else {
		u32 ifindex = skb->ifindex;
		if (!scl_interfaces.lookup(&ifindex) || identity_of(&packet.flow.saddr, NULL) != SCL_IDENTITY_HOST)
			return TC_ACT_OK;
	}
	refresh(&from_node, &packet, 0, now);
	scl_conntrack.update(&packet.flow, &from_node);
	return TC_ACT_OK;
}
