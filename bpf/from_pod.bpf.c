// SPDX-License-Identifier: Apache-2.0
// TC ingress of a pod's node-side veth: every packet the pod sends passes here.
//
// Enforces the destination pod's ingress policy by identity, in the kernel, and hands flows on L7-governed
// ports to the node Envoy by marking them (an nftables TPROXY rule in the node namespace delivers marked
// packets to Envoy's transparent listener). Everything else stays in the kernel.
//
// Compiled by BCC at load time. SCL_PIN_DIR (a string) is where the maps are pinned, so they outlive the
// agent and are shared with the next load.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "sidecarless.h"

BPF_TABLE_PINNED("hash", struct scl_endpoint_key, struct scl_endpoint_info, scl_endpoints,
		 SCL_ENDPOINTS_MAX, SCL_PIN_DIR "/scl_endpoints");
BPF_TABLE_PINNED("hash", struct scl_policy_key, struct scl_policy_entry, scl_policy,
		 SCL_POLICY_MAX, SCL_PIN_DIR "/scl_policy");
BPF_TABLE_PINNED("lru_hash", struct scl_ct_key, struct scl_policy_entry, scl_conntrack,
		 SCL_CONNTRACK_MAX, SCL_PIN_DIR "/scl_conntrack");
BPF_TABLE_PINNED("array", u32, u64, scl_counters, SCL_COUNTER_MAX, SCL_PIN_DIR "/scl_counters");
BPF_RINGBUF_OUTPUT(scl_events, SCL_EVENT_PAGES);

static __always_inline void count(u32 counter)
{
	u64 *value = scl_counters.lookup(&counter);
	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline struct scl_policy_entry *lookup_policy(__be32 endpoint_ip, u32 peer, u16 port, u8 protocol)
{
	struct scl_policy_key key = {};
	struct scl_policy_entry *entry;

	key.endpoint_ip = endpoint_ip;
	key.protocol = protocol;
	// Most specific first: this peer on this port, any peer on this port, this peer on every port, anyone.
	key.peer_identity = peer;
	key.port = port;
	entry = scl_policy.lookup(&key);
	if (entry)
		return entry;
	key.peer_identity = SCL_IDENTITY_ANY;
	entry = scl_policy.lookup(&key);
	if (entry)
		return entry;
	key.peer_identity = peer;
	key.port = 0;
	entry = scl_policy.lookup(&key);
	if (entry)
		return entry;
	key.peer_identity = SCL_IDENTITY_ANY;
	return scl_policy.lookup(&key);
}

static __always_inline int drop(struct __sk_buff *skb, struct scl_ct_key *flow, u32 source_identity,
				u32 destination_identity, u8 tcp_flags, u8 reason)
{
	struct scl_drop_event *event;

	count(SCL_COUNTER_DROPPED);
	event = scl_events.ringbuf_reserve(sizeof(*event));
	if (!event) {
		count(SCL_COUNTER_EVENTS_LOST);
		return TC_ACT_SHOT;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	event->saddr = flow->saddr;
	event->daddr = flow->daddr;
	event->sport = flow->sport;
	event->dport = flow->dport;
	event->source_identity = source_identity;
	event->destination_identity = destination_identity;
	event->ifindex = skb->ifindex;
	event->protocol = flow->protocol;
	event->reason = reason;
	event->tcp_flags = tcp_flags;
	event->pad = 0;
	scl_events.ringbuf_submit(event, 0);
	return TC_ACT_SHOT;
}

static __always_inline int apply(struct __sk_buff *skb, struct scl_policy_entry *verdict)
{
	if (verdict->action == SCL_ACTION_REDIRECT) {
		skb->mark = SCL_MARK_TO_PROXY | ((u32)verdict->proxy_port << 16);
		count(SCL_COUNTER_REDIRECTED);
	}
	return TC_ACT_OK;
}

int from_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct scl_ct_key flow = {};
	struct scl_ct_key reverse = {};
	struct scl_policy_entry *tracked;
	struct scl_policy_entry verdict = {};
	struct scl_endpoint_key endpoint_key = {};
	struct scl_endpoint_info *destination, *source;
	u32 source_identity = SCL_IDENTITY_WORLD;
	u8 tcp_flags = 0;
	int is_syn = 0;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	// IPv4 only for now; ARP must pass for the pod to reach its gateway.
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;

	flow.saddr = ip->saddr;
	flow.daddr = ip->daddr;
	flow.protocol = ip->protocol;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			return TC_ACT_SHOT;
		flow.sport = tcp->source;
		flow.dport = tcp->dest;
		tcp_flags = ((u8 *)tcp)[13];
		is_syn = tcp->syn && !tcp->ack;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)ip + ip->ihl * 4;
		if ((void *)(udp + 1) > data_end)
			return TC_ACT_SHOT;
		flow.sport = udp->source;
		flow.dport = udp->dest;
	}

	// A SYN always re-evaluates policy: a reused 4-tuple must not inherit an old verdict.
	if (!is_syn) {
		tracked = scl_conntrack.lookup(&flow);
		if (tracked)
			return apply(skb, tracked);
		reverse.saddr = flow.daddr;
		reverse.daddr = flow.saddr;
		reverse.sport = flow.dport;
		reverse.dport = flow.sport;
		reverse.protocol = flow.protocol;
		if (scl_conntrack.lookup(&reverse))
			return TC_ACT_OK; // a reply of a tracked flow
	}

	verdict.action = SCL_ACTION_ALLOW;
	endpoint_key.ip = ip->daddr;
	destination = scl_endpoints.lookup(&endpoint_key);
	endpoint_key.ip = ip->saddr;
	source = scl_endpoints.lookup(&endpoint_key);
	if (source)
		source_identity = source->identity;
	if (destination && (destination->flags & SCL_ENDPOINT_ENFORCE_INGRESS)) {
		struct scl_policy_entry *allowed =
			lookup_policy(ip->daddr, source_identity, bpf_ntohs(flow.dport), flow.protocol);
		if (!allowed)
			return drop(skb, &flow, source_identity, destination->identity, tcp_flags,
				    SCL_DROP_POLICY_DENIED);
		if (allowed->action == SCL_ACTION_PROXY_UNAVAILABLE)
			return drop(skb, &flow, source_identity, destination->identity, tcp_flags,
				    SCL_DROP_PROXY_UNAVAILABLE);
		verdict = *allowed;
	}
	scl_conntrack.update(&flow, &verdict);
	return apply(skb, &verdict);
}
