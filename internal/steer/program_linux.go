//go:build linux

package steer

import (
	"encoding/binary"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// Offsets in struct sk_reuseport_md (include/uapi/linux/bpf.h).
const (
	mdEthProtocol = 20 // __u32: skb->protocol, network byte order
	mdMigratingSk = 48 // struct bpf_sock * or NULL (5.14)
)

// Offsets in struct bpf_sock.
const (
	bsFamily = 4
	bsDstIP6 = 56 // __u32 dst_ip6[4]: the peer's address, network byte order
)

const (
	afInet  = 2
	afInet6 = 10

	// bpf_skb_load_bytes_relative's start_header: offsets from the
	// network header.
	hdrStartNet = 1
	ip4SrcOff   = 12 // struct iphdr saddr
	ip6SrcOff   = 8  // struct ipv6hdr saddr

	skDrop = 0
	skPass = 1
)

// The values the program compares with, as it reads them: network byte
// order fields loaded as native integers.
var (
	ethPIPNative   = int32(binary.NativeEndian.Uint16([]byte{0x08, 0x00}))
	ethPIPv6Native = int32(binary.NativeEndian.Uint16([]byte{0x86, 0xdd}))
	v4MappedWord   = int64(binary.NativeEndian.Uint32([]byte{0, 0, 0xff, 0xff})) // dst_ip6[2] of ::ffff:a.b.c.d
)

// instructions builds the program for spec (with its defaults filled).
//
// With migrate, the program first looks at ctx->migrating_sk: when the
// kernel moves a closing listener's request or child socket there may be
// no packet (the kernel passes an empty skb), so the client's address is
// the migrating socket's peer address. A dual-stack listener's sockets for
// IPv4 clients are AF_INET6 with a v4-mapped peer: those count as IPv4,
// as their packets do. Without migrate (kernels before 5.14 refuse the
// migrating_sk access) only the packet is read.
//
// Registers: r6 the context throughout; r2 (IPv4: the address; IPv6: the
// window's high word) and r3 (IPv6: the window's low word) carry network
// byte order words to the "v4" or "v6" label.
func instructions(spec Spec, slots *ebpf.Map, migrate bool) asm.Instructions {
	j, shift6 := v6Window(spec.V6Prefix)
	shift4 := int32(32 - spec.V4Prefix)
	mask := int32(spec.mask())

	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	if migrate {
		insns = append(insns,
			asm.LoadMem(asm.R1, asm.R6, mdMigratingSk, asm.DWord),
			asm.JEq.Imm(asm.R1, 0, "packet"),
			asm.LoadMem(asm.R2, asm.R1, bsFamily, asm.Word),
			asm.JEq.Imm(asm.R2, afInet, "mig4"),
			asm.JNE.Imm(asm.R2, afInet6, "drop"),
			// v4-mapped (::ffff:a.b.c.d)? Then the last word is the
			// IPv4 address.
			asm.LoadMem(asm.R3, asm.R1, bsDstIP6, asm.Word),
			asm.JNE.Imm(asm.R3, 0, "mig6"),
			asm.LoadMem(asm.R3, asm.R1, bsDstIP6+4, asm.Word),
			asm.JNE.Imm(asm.R3, 0, "mig6"),
			asm.LoadMem(asm.R3, asm.R1, bsDstIP6+8, asm.Word),
			// A 64-bit immediate: JNE.Imm sign-extends its 32 bits, and
			// the loaded word is zero-extended.
			asm.LoadImm(asm.R4, v4MappedWord, asm.DWord),
			asm.JNE.Reg(asm.R3, asm.R4, "mig6"),
			asm.LoadMem(asm.R2, asm.R1, bsDstIP6+12, asm.Word),
			asm.Ja.Label("v4"),
			asm.LoadMem(asm.R2, asm.R1, bsDstIP6-4, asm.Word).WithSymbol("mig4"), // dst_ip4
			asm.Ja.Label("v4"),
			asm.LoadMem(asm.R2, asm.R1, bsDstIP6+int16(4*j), asm.Word).WithSymbol("mig6"),
			asm.LoadMem(asm.R3, asm.R1, bsDstIP6+int16(4*j+4), asm.Word),
			asm.Ja.Label("v6"),
		)
	}
	// load(off, n) copies n bytes of the network header at off to fp-16.
	load := func(off, n int32) asm.Instructions {
		return asm.Instructions{
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.Mov.Imm(asm.R2, off),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -16),
			asm.Mov.Imm(asm.R4, n),
			asm.Mov.Imm(asm.R5, hdrStartNet),
			asm.FnSkbLoadBytesRelative.Call(),
			asm.JNE.Imm(asm.R0, 0, "drop"),
		}
	}
	pkt := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R6, mdEthProtocol, asm.Word).WithSymbol("packet"),
		asm.JEq.Imm(asm.R2, ethPIPNative, "pkt4"),
		asm.JNE.Imm(asm.R2, ethPIPv6Native, "drop"),
	}
	pkt = append(pkt, load(ip6SrcOff+int32(4*j), 8)...)
	pkt = append(pkt,
		asm.LoadMem(asm.R2, asm.RFP, -16, asm.Word),
		asm.LoadMem(asm.R3, asm.RFP, -12, asm.Word),
		asm.Ja.Label("v6"),
	)
	l4 := load(ip4SrcOff, 4)
	l4[0] = l4[0].WithSymbol("pkt4")
	pkt = append(pkt, l4...)
	pkt = append(pkt, asm.LoadMem(asm.R2, asm.RFP, -16, asm.Word))
	insns = append(insns, pkt...)

	insns = append(insns,
		// IPv4: (addr >> (32 - V4Prefix)) & mask, in 32 bits. HostTo(BE)
		// is the same swap as BE-to-host, and zero-extends.
		asm.HostTo(asm.BE, asm.R2, asm.Word).WithSymbol("v4"),
		asm.RSh.Imm32(asm.R2, shift4),
		asm.Ja.Label("key"),
		// IPv6: the 64-bit window of words j, j+1, shifted.
		asm.HostTo(asm.BE, asm.R2, asm.Word).WithSymbol("v6"),
		asm.HostTo(asm.BE, asm.R3, asm.Word),
		asm.LSh.Imm(asm.R2, 32),
		asm.Or.Reg(asm.R2, asm.R3),
		asm.RSh.Imm(asm.R2, int32(shift6)),

		asm.And.Imm(asm.R2, mask).WithSymbol("key"),
		asm.StoreMem(asm.RFP, -4, asm.R2, asm.Word),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, slots.FD()),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -4),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSkSelectReuseport.Call(),
		asm.JNE.Imm(asm.R0, 0, "drop"),
		asm.Mov.Imm(asm.R0, skPass),
		asm.Return(),
		// An empty slot (or a packet without an address) drops: SK_PASS
		// without a selection would let the kernel hash the connection to
		// any socket of the group, another slot's.
		asm.Mov.Imm(asm.R0, skDrop).WithSymbol("drop"),
		asm.Return(),
	)
	return insns
}
