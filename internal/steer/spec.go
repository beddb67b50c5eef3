// Package steer routes the new connections of one SO_REUSEPORT group to
// the socket of the client's slot, with an SK_REUSEPORT BPF program that
// selects from a REUSEPORT_SOCKARRAY: the same slot bits as the DNAT
// backends, with no NAT rule and no conntrack entry.
//
// # Model
//
// The sockets of a group are bound to the same address and port with
// SO_REUSEPORT (ListenTCP, ListenUDP). A Selector is one program and one
// array; Attach sets its program for the whole group, Set points a slot's
// array entry at one of the group's sockets. The kernel runs the program
// only when it picks a socket for a new connection (a SYN, a migrating
// request) or for every UDP datagram, so a re-point (Set) moves new
// connections and leaves established ones where they are.
//
// An empty slot drops: the program returns SK_DROP rather than SK_PASS,
// which would let the kernel hash the connection to any member of the
// group. A TCP client then gets a reset (no listener matched), a UDP
// datagram is dropped.
//
// # Kernel and privileges
//
// SK_REUSEPORT programs need Linux 4.19 and CAP_BPF (CAP_SYS_ADMIN before
// 5.8); nothing here needs CAP_NET_ADMIN. Moving a closing listener's
// queued connections to the slot's new socket needs Linux 5.14
// (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE); on older kernels New falls back to
// plain selection and Selector.Migrates says so.
//
// # Sockets and arrays
//
// A socket can be in one REUSEPORT_SOCKARRAY at a time (the kernel marks
// it through sk_user_data and refuses a second insert with EBUSY), and a
// closing socket leaves its array by itself. That is why a resize does
// not build a second array: Selector.Reprogram builds a new program over
// the same array, which always has MaxWorkers entries. For the same
// reason a process taking a group over (a new master) needs the array as
// well as the sockets: Selector.ArrayFile and Open hand it on.
//
// A closing TCP listener's queued connections move only to the socket its
// slot points at when it closes: re-point the slot (Set) first, then close
// the old socket.
package steer

import (
	"fmt"
	"math/bits"
	"net/netip"
	"strings"
)

// Limits and defaults of a Spec.
const (
	MaxWorkers       = 256 // entries of every array: the largest Workers
	DefaultV4Prefix  = 32  // the IPv4 address's own low bits
	DefaultV6Prefix  = 64  // the low bits of the IPv6 /64 prefix
	DefaultName      = "ipc_steer"
	maxObjNameLength = 15 // BPF_OBJ_NAME_LEN less the NUL
)

// Spec is what a program is built for. A Selector's Spec never changes;
// Selector.Reprogram builds another Selector over the same array for
// another Spec.
type Spec struct {
	// Workers is the number of slots: a power of two from 1 to MaxWorkers.
	Workers int
	// V4Prefix: an IPv4 client's slot is the low log2(Workers) bits of the
	// first V4Prefix bits of its address. 1..32; 0 means DefaultV4Prefix
	// (32).
	V4Prefix int
	// V6Prefix is the same for IPv6: 1..128; 0 means DefaultV6Prefix (64,
	// the low bits of the /64 prefix).
	V6Prefix int
	// Name names the program and the array in bpftool's listings: letters,
	// digits, '_' and '.', other characters become '_', cut to 15
	// characters. Empty means DefaultName ("ipc_steer").
	Name string
}

// withDefaults fills the zero fields and checks the result, naming the
// field, its allowed range and the fix.
func (s Spec) withDefaults() (Spec, error) {
	if s.V4Prefix == 0 {
		s.V4Prefix = DefaultV4Prefix
	}
	if s.V6Prefix == 0 {
		s.V6Prefix = DefaultV6Prefix
	}
	if s.Name == "" {
		s.Name = DefaultName
	}
	s.Name = objName(s.Name)
	if s.Workers < 1 || s.Workers > MaxWorkers || s.Workers&(s.Workers-1) != 0 {
		return s, fmt.Errorf("steer: Spec.Workers %d is not a power of two from 1 to %d: use 1, 2, 4, ... %d", s.Workers, MaxWorkers, MaxWorkers)
	}
	k := s.slotBits()
	if s.V4Prefix < max(k, 1) || s.V4Prefix > 32 {
		return s, fmt.Errorf("steer: Spec.V4Prefix %d is outside %d..32 (%d workers take %d bits below the prefix): use 32 for the address's own low bits", s.V4Prefix, max(k, 1), s.Workers, k)
	}
	if s.V6Prefix < max(k, 1) || s.V6Prefix > 128 {
		return s, fmt.Errorf("steer: Spec.V6Prefix %d is outside %d..128 (%d workers take %d bits below the prefix): use 64 for the low bits of the /64 or 128 for the address's own", s.V6Prefix, max(k, 1), s.Workers, k)
	}
	return s, nil
}

// slotBits is log2(Workers).
func (s Spec) slotBits() int { return bits.Len(uint(s.Workers)) - 1 }

// mask is Workers-1.
func (s Spec) mask() uint64 { return uint64(s.Workers - 1) }

// Slot is the slot of a client address, computed as the program does:
// (addr >> (32 - V4Prefix)) & (Workers-1) for IPv4, the same over the
// 128-bit address for IPv6. An IPv4-mapped IPv6 address counts as IPv4,
// because that is how its packets reach a dual-stack socket. Zero fields
// take their defaults; an invalid Spec or address gives -1.
func (s Spec) Slot(addr netip.Addr) int {
	s, err := s.withDefaults()
	if err != nil || !addr.IsValid() {
		return -1
	}
	addr = addr.Unmap()
	if addr.Is4() {
		a := addr.As4()
		v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
		return int(uint64(v>>(32-s.V4Prefix)) & s.mask())
	}
	a := addr.As16()
	var hi, lo uint64
	for i := range 8 {
		hi = hi<<8 | uint64(a[i])
		lo = lo<<8 | uint64(a[8+i])
	}
	shift := uint(128 - s.V6Prefix)
	var v uint64
	switch {
	case shift >= 64:
		v = hi >> (shift - 64)
	case shift == 0:
		v = lo
	default:
		v = lo>>shift | hi<<(64-shift)
	}
	return int(v & s.mask())
}

// v6Window is where the IPv6 slot bits are: the 64-bit window made of
// address words j and j+1 (big-endian, word 0 first) holds them, and
// shifting the window right by shift brings them to the bottom. The slot
// bits are bits [prefix-k, prefix) from the top (k <= 8), so they may
// straddle a word boundary, but they always fit in two adjacent words:
// j = 0 for prefixes up to 64, 1 up to 96, 2 above.
func v6Window(prefix int) (j, shift int) {
	switch {
	case prefix <= 64:
		j = 0
	case prefix <= 96:
		j = 1
	default:
		j = 2
	}
	return j, 32*j + 64 - prefix
}

// objName makes name acceptable as a BPF object name: the kernel takes
// letters, digits, '_' and '.', at most 15 of them.
func objName(name string) string {
	var b strings.Builder
	for _, r := range name {
		if b.Len() == maxObjNameLength {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '.':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}
