// SPDX-License-Identifier: Apache-2.0
// TC programs on the node side of each pod's veth (and on the node's other interfaces).
//
// from_pod (TC ingress: every packet a pod sends, or that enters the node from outside) decides flows: the
// source pod's egress policy and the destination pod's ingress policy, both by identity, in the kernel.
// A flow on an L7-governed port is marked for the proxy; an nftables TPROXY rule in the node namespace
// delivers it to Envoy's transparent listener. Everything else stays in the kernel: an allowed flow between two
// pods of this node goes from one veth straight to the other (bpf_redirect_neigh), past the node's IP stack.
//
// A pod is assumed hostile (it has CAP_NET_RAW): only IPv4 and ARP frames pass, untagged, with the ethertype
// the kernel agrees with; a packet must carry its pod's own source address; conntrack state is created only by
// a packet that passed policy in its own direction, expires, and is decided again after every policy change.
//
// to_pod (TC egress: every packet entering a pod) records flows the node itself starts (Envoy's upstream
// connections, probes), which policy always allows, so the pod's replies are known as replies. Packets from_pod
// already let through carry its mark and pass at once: most packets cost to_pod no lookup.
//
// Compiled by BCC at load time. SCL_PIN_DIR (a string) is where the maps are pinned, so they outlive the
// agent and are shared with the next load.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_arp.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
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

#include "sidecarless.h"

BPF_TABLE_PINNED("hash", struct scl_endpoint_key, struct scl_endpoint_info, scl_endpoints,
		 SCL_ENDPOINTS_MAX, SCL_PIN_DIR "/scl_endpoints");
BPF_TABLE_PINNED("hash", u32, struct scl_interface_info, scl_interfaces, SCL_ENDPOINTS_MAX,
		 SCL_PIN_DIR "/scl_interfaces");
BPF_TABLE_PINNED("lpm_trie", struct scl_ipcache_key, struct scl_ipcache_value, scl_ipcache,
		 SCL_IPCACHE_MAX, SCL_PIN_DIR "/scl_ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct scl_policy_key, struct scl_policy_entry, scl_policy,
		 SCL_POLICY_MAX, SCL_PIN_DIR "/scl_policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct scl_ct_key, struct scl_ct_entry, scl_conntrack,
		 SCL_CONNTRACK_MAX, SCL_PIN_DIR "/scl_conntrack");
BPF_TABLE_PINNED("lru_hash", struct scl_fragment_key, struct scl_fragment_ports, scl_fragments,
		 SCL_FRAGMENTS_MAX, SCL_PIN_DIR "/scl_fragments");
BPF_TABLE_PINNED("array", u32, u64, scl_counters, SCL_COUNTER_MAX, SCL_PIN_DIR "/scl_counters");
BPF_TABLE_PINNED("array", u32, u64, scl_config, SCL_CONFIG_MAX, SCL_PIN_DIR "/scl_config");
BPF_RINGBUF_OUTPUT(scl_events, SCL_EVENT_PAGES);

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_RST 0x04
#define IP_MORE_FRAGMENTS 0x2000
#define IP_FRAGMENT_OFFSET 0x1fff

// What parse() found: an IPv4 packet, an ARP packet, or else a drop reason (SCL_DROP_*).
#define SCL_PARSED_IPV4 0
#define SCL_PARSED_ARP 100

struct scl_packet {
	struct scl_ct_key flow;
	u8 tcp_flags;
	u8 is_syn;
	u8 first_fragment; /* more fragments follow: their ports are recorded once this one passes */
	u8 pad;
	__be16 ethertype;
	__be16 ip_id;
	__be32 arp_sender;
};

// A policy decision for one flow.
struct scl_verdict {
	struct scl_ct_entry entry; /* what the flow's packets get */
	u32 source_identity;
	u32 destination_identity;
	u8 reason;    /* 0: allowed; else SCL_DROP_* */
	u8 direction; /* the direction that decided */
	u8 enforced;  /* a policy of either pod decided it (verdict events report only those) */
};

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

// Decide on what this program sees, never on what the stack may later make of it: a VLAN tag (in the data, or
// moved into skb->vlan_tci before TC), or an ethertype that disagrees with skb->protocol, is dropped, since the
// stack could strip the tag and deliver what is behind it. Only IPv4 and ARP pass.
static __always_inline int parse(struct __sk_buff *skb, struct scl_packet *packet)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	u16 fragment;

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
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return SCL_DROP_UNSUPPORTED_L3;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return SCL_DROP_INVALID_PACKET;
	if (ip->version != 4 || ip->ihl < 5)
		return SCL_DROP_INVALID_PACKET;
	packet->flow.saddr = ip->saddr;
	packet->flow.daddr = ip->daddr;
	packet->flow.protocol = ip->protocol;
	packet->ip_id = ip->id;
	fragment = bpf_ntohs(ip->frag_off);
	if (fragment & IP_FRAGMENT_OFFSET) {
		// A later fragment carries no L4 header: its ports are those its first fragment was let through with.
		struct scl_fragment_key key = {.saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id,
					       .protocol = ip->protocol};
		struct scl_fragment_ports *ports = scl_fragments.lookup(&key);
		if (!ports)
			return SCL_DROP_UNKNOWN_FRAGMENT;
		packet->flow.sport = ports->sport;
		packet->flow.dport = ports->dport;
		return SCL_PARSED_IPV4;
	}
	packet->first_fragment = (fragment & IP_MORE_FRAGMENTS) != 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			return SCL_DROP_INVALID_PACKET;
		packet->flow.sport = tcp->source;
		packet->flow.dport = tcp->dest;
		packet->tcp_flags = ((u8 *)tcp)[13];
		packet->is_syn = tcp->syn && !tcp->ack;
	} else if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
		struct scl_ports *ports = (void *)ip + ip->ihl * 4;
		if ((void *)(ports + 1) > data_end)
			return SCL_DROP_INVALID_PACKET;
		packet->flow.sport = ports->source;
		packet->flow.dport = ports->dest;
	}
	return SCL_PARSED_IPV4;
}

static __always_inline void reverse_of(struct scl_ct_key *flow, struct scl_ct_key *reverse)
{
	reverse->saddr = flow->daddr;
	reverse->daddr = flow->saddr;
	reverse->sport = flow->dport;
	reverse->dport = flow->sport;
	reverse->protocol = flow->protocol;
}

static __always_inline u32 identity_of(__be32 ip, struct scl_endpoint_info *endpoint)
{
	struct scl_ipcache_key key = {.prefixlen = 32, .ip = ip};
	struct scl_ipcache_value *value;

	if (endpoint)
		return endpoint->identity;
	value = scl_ipcache.lookup(&key);
	return value ? value->identity : SCL_IDENTITY_WORLD;
}

// The policy entry for traffic of `endpoint_ip` in `direction` with `peer`: the peer's own entry (the
// longest port prefix), else the any-peer entry. Compile makes the peer's entry include the any-peer rules.
static __always_inline struct scl_policy_entry *lookup_policy(__be32 endpoint_ip, u8 direction, u32 peer,
							     u8 protocol, __be16 port)
{
	struct scl_policy_key key = {};
	struct scl_policy_entry *entry;

	key.prefixlen = SCL_POLICY_FIXED_BITS + 16;
	key.endpoint_ip = endpoint_ip;
	key.peer_identity = peer;
	key.direction = direction;
	key.protocol = protocol;
	key.port = port;
	entry = scl_policy.lookup(&key);
	if (entry)
		return entry;
	key.peer_identity = SCL_IDENTITY_ANY;
	return scl_policy.lookup(&key);
}

static __always_inline void notify(struct __sk_buff *skb, struct scl_packet *packet, u32 source_identity,
				   u32 destination_identity, u8 direction, u8 kind, u8 reason, u8 action)
{
	struct scl_drop_event *event = scl_events.ringbuf_reserve(sizeof(*event));

	if (!event) {
		count(SCL_COUNTER_EVENTS_LOST);
		return;
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
	scl_events.ringbuf_submit(event, 0);
}

static __always_inline int drop(struct __sk_buff *skb, struct scl_packet *packet, u32 source_identity,
				u32 destination_identity, u8 direction, u8 reason)
{
	count(SCL_COUNTER_DROPPED);
	notify(skb, packet, source_identity, destination_identity, direction, SCL_EVENT_DROP, reason, 0);
	return TC_ACT_SHOT;
}

// The action of one direction: the entry's, or what the direction does without one.
static __always_inline u8 decide(struct scl_endpoint_info *endpoint, u32 enforce_flag, __be32 endpoint_ip,
				 u8 direction, u32 peer, struct scl_ct_key *flow, u16 *proxy_port)
{
	struct scl_policy_entry *entry;

	if (!endpoint)
		return SCL_ACTION_ALLOW; // not a pod of this node: its own node enforces its policy
	entry = lookup_policy(endpoint_ip, direction, peer, flow->protocol, flow->dport);
	if (!entry)
		return (endpoint->flags & enforce_flag) ? SCL_ACTION_NONE : SCL_ACTION_ALLOW;
	*proxy_port = entry->proxy_port;
	return entry->action;
}

// The policy verdict for the flow opened by a packet with tuple `flow`.
static __always_inline void evaluate(struct scl_ct_key *flow, struct scl_verdict *verdict)
{
	struct scl_endpoint_key endpoint_key = {};
	struct scl_endpoint_info *source, *destination;
	u16 egress_proxy = 0, ingress_proxy = 0;
	u8 egress, ingress;

	endpoint_key.ip = flow->saddr;
	source = scl_endpoints.lookup(&endpoint_key);
	endpoint_key.ip = flow->daddr;
	destination = scl_endpoints.lookup(&endpoint_key);
	verdict->source_identity = identity_of(flow->saddr, source);
	verdict->destination_identity = identity_of(flow->daddr, destination);
	verdict->enforced = (source && (source->flags & SCL_ENDPOINT_ENFORCE_EGRESS)) ||
			    (destination && (destination->flags & SCL_ENDPOINT_ENFORCE_INGRESS));

	egress = decide(source, SCL_ENDPOINT_ENFORCE_EGRESS, flow->saddr, SCL_DIRECTION_EGRESS,
			verdict->destination_identity, flow, &egress_proxy);
	ingress = decide(destination, SCL_ENDPOINT_ENFORCE_INGRESS, flow->daddr, SCL_DIRECTION_INGRESS,
			 verdict->source_identity, flow, &ingress_proxy);

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
	key.id = packet->ip_id;
	key.protocol = packet->flow.protocol;
	ports.sport = packet->flow.sport;
	ports.dport = packet->flow.dport;
	scl_fragments.update(&key, &ports);
}

// The source check: a pod's packets carry its own address (a spoofed source would borrow another pod's
// identity and prime conntrack); a pod's address never arrives from anywhere but its own veth.
static __always_inline int source_allowed(struct __sk_buff *skb, __be32 saddr)
{
	u32 ifindex = skb->ifindex;
	struct scl_interface_info *interface = scl_interfaces.lookup(&ifindex);
	struct scl_endpoint_key key = {.ip = saddr};
	struct scl_endpoint_info *owner;

	if (interface)
		return interface->ip4 && saddr == interface->ip4; /* 0: an IPv6-only pod, whose IPv4 is all spoofed */
	owner = scl_endpoints.lookup(&key);
	return !owner || !owner->ifindex || owner->ifindex == ifindex;
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
		if (packet.arp_sender && !source_allowed(skb, packet.arp_sender))
			return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, SCL_DROP_INVALID_SOURCE);
		return pass(skb, 0);
	}
	if (parsed != SCL_PARSED_IPV4)
		return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, parsed);
	if (!source_allowed(skb, packet.flow.saddr))
		return drop(skb, &packet, 0, 0, SCL_DIRECTION_EGRESS, SCL_DROP_INVALID_SOURCE);

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
		return pass(skb, tracked->reply_ifindex);
	}

	evaluate(&packet.flow, &verdict);
	if (verdict.reason)
		return drop(skb, &packet, verdict.source_identity, verdict.destination_identity, verdict.direction,
			    verdict.reason);
	verdict.entry.revision = revision;
	refresh(&verdict.entry, &packet, 0, now);
	scl_conntrack.update(&packet.flow, &verdict.entry);
	remember_fragment(&packet);
	if (verdict.entry.ifindex)
		count(SCL_COUNTER_DIRECT_FLOWS);
	// A policy verdict for each new flow that a pod's policy decided (as `cilium monitor` shows them), while a
	// monitor watches: an event per new connection costs the agent more than the kernel spends on the flow.
	if (verdict.enforced && config_or(SCL_CONFIG_VERDICT_EVENTS, 0) &&
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
	if (parsed == SCL_PARSED_ARP)
		return TC_ACT_OK;
	if (parsed != SCL_PARSED_IPV4)
		return drop(skb, &packet, 0, 0, SCL_DIRECTION_INGRESS, parsed);
	now = now_ticks();
	tracked = tracked_flow(&packet, &opened, &is_reply, now);
	remember_fragment(&packet);
	if (tracked) {
		refresh(tracked, &packet, is_reply, now);
		return TC_ACT_OK;
	}
	// Not seen by from_pod: from the node's stack. A flow the node itself starts (from one of its addresses)
	// is recorded, so the pod's replies are known as replies. Anything else the stack delivers (the proxy
	// answering for a flow whose entry expired) passes without creating state.
	if (identity_of(packet.flow.saddr, NULL) == SCL_IDENTITY_HOST) {
		refresh(&from_node, &packet, 0, now);
		scl_conntrack.update(&packet.flow, &from_node);
	}
	return TC_ACT_OK;
}
