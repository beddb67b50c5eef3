package steer

import (
	"net/netip"
	"strings"
	"testing"
)

func TestSpecSlot(t *testing.T) {
	for _, c := range []struct {
		spec Spec
		addr string
		want int
	}{
		// Defaults: IPv4's own low bits, the low bits of the IPv6 /64.
		{Spec{Workers: 4}, "198.18.1.0", 0},
		{Spec{Workers: 4}, "198.18.1.7", 3},
		{Spec{Workers: 4}, "198.18.1.254", 2},
		{Spec{Workers: 1}, "198.18.1.255", 0},
		{Spec{Workers: 256}, "198.18.1.200", 200},
		{Spec{Workers: 4}, "fd00:0:0:7::2", 3},
		{Spec{Workers: 4}, "fd00:0:0:6:ffff:ffff:ffff:ffff", 2}, // the interface ID does not count
		{Spec{Workers: 256}, "fd00:0:0:1ab::", 0xab},
		// An IPv4-mapped address is IPv4: that is how a dual-stack socket
		// sees its packets.
		{Spec{Workers: 4}, "::ffff:198.18.1.6", 2},
		// Other prefixes.
		{Spec{Workers: 4, V4Prefix: 24}, "198.18.7.1", 3},
		{Spec{Workers: 8, V4Prefix: 29}, "not an address", -1},
		{Spec{Workers: 8, V4Prefix: 29}, "198.18.0.88", 88 >> 3 & 7},
		{Spec{Workers: 2, V4Prefix: 1}, "198.18.0.1", 1},
		{Spec{Workers: 2, V4Prefix: 1}, "10.0.0.1", 0},
		{Spec{Workers: 4, V4Prefix: 17}, "198.19.128.0", 0b11}, // 198 = 11000110, 19 = 00010011, bit 16 = 1
		{Spec{Workers: 4, V6Prefix: 128}, "fd00::6", 2},
		{Spec{Workers: 16, V6Prefix: 48}, "fd00:0:5::", 5},
		// Slot bits straddling a 32-bit word: bits 31 and 32 (prefix 33).
		{Spec{Workers: 4, V6Prefix: 33}, "fd00:1:8000::", 0b11},
		{Spec{Workers: 4, V6Prefix: 33}, "fd00:1::", 0b10},
		{Spec{Workers: 4, V6Prefix: 33}, "fd00:0:8000::", 0b01},
		// ... bits 63 and 64 (prefix 65), straddling the two halves.
		{Spec{Workers: 4, V6Prefix: 65}, "fd00:0:0:1:8000::", 0b11},
		{Spec{Workers: 4, V6Prefix: 65}, "fd00:0:0:1::", 0b10},
		// ... bits 89..96 (prefix 97), across words 2 and 3.
		{Spec{Workers: 256, V6Prefix: 97}, "fd00::7f:8000:0", 0xff},
		{Spec{Workers: 256, V6Prefix: 97}, "fd00::40:0:0", 0x80},
		{Spec{Workers: 2, V6Prefix: 1}, "fd00::", 1},
		{Spec{Workers: 2, V6Prefix: 1}, "2001:db8::", 0},
		// Invalid specs.
		{Spec{Workers: 3}, "198.18.1.1", -1},
		{Spec{Workers: 512}, "198.18.1.1", -1},
		{Spec{Workers: 4, V4Prefix: 1}, "198.18.1.1", -1},
		{Spec{Workers: 4, V6Prefix: 129}, "fd00::1", -1},
	} {
		addr, err := netip.ParseAddr(c.addr)
		if err != nil {
			addr = netip.Addr{}
		}
		if got := c.spec.Slot(addr); got != c.want {
			t.Errorf("%+v.Slot(%s) = %d, want %d", c.spec, c.addr, got, c.want)
		}
	}
	// The window the program reads agrees with Slot for every prefix: the
	// slot of an address with one bit set is that bit's weight in the
	// slot, or 0 where it is not a slot bit.
	for workers := 1; workers <= MaxWorkers; workers *= 2 {
		k := Spec{Workers: workers}.slotBits()
		for prefix := max(k, 1); prefix <= 128; prefix++ {
			spec := Spec{Workers: workers, V6Prefix: prefix}
			j, shift := v6Window(prefix)
			if shift < 0 || shift > 63 || 32*j > prefix-k || prefix > 32*j+64 {
				t.Fatalf("prefix %d, %d workers: window at word %d, shift %d does not hold the slot bits", prefix, workers, j, shift)
			}
			for bit := range 128 {
				var b [16]byte
				b[bit/8] = 0x80 >> (bit % 8)
				want := 0
				if bit >= prefix-k && bit < prefix {
					want = 1 << (prefix - 1 - bit)
				}
				if got := spec.Slot(netip.AddrFrom16(b)); got != want {
					t.Fatalf("%+v.Slot(bit %d) = %d, want %d", spec, bit, got, want)
				}
			}
		}
	}
}

func TestSpecInvalid(t *testing.T) {
	for _, c := range []struct {
		spec Spec
		want string
	}{
		{Spec{}, "Spec.Workers 0 is not a power of two from 1 to 256"},
		{Spec{Workers: 6}, "Spec.Workers 6"},
		{Spec{Workers: 512}, "Spec.Workers 512"},
		{Spec{Workers: 8, V4Prefix: 2}, "Spec.V4Prefix 2 is outside 3..32"},
		{Spec{Workers: 8, V4Prefix: 33}, "Spec.V4Prefix 33 is outside 3..32"},
		{Spec{Workers: 1, V4Prefix: -1}, "Spec.V4Prefix -1 is outside 1..32"},
		{Spec{Workers: 256, V6Prefix: 7}, "Spec.V6Prefix 7 is outside 8..128"},
		{Spec{Workers: 2, V6Prefix: 129}, "Spec.V6Prefix 129 is outside 1..128"},
	} {
		_, err := c.spec.withDefaults()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one containing %q", c.spec, err, c.want)
		}
	}
	s, err := Spec{Workers: 4, Name: "ipcluster web:443/tcp and more"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if s.V4Prefix != 32 || s.V6Prefix != 64 || s.Name != "ipcluster_web_4" {
		t.Errorf("defaults: %+v, want prefixes 32 and 64, name ipcluster_web_4", s)
	}
	if s, _ := (Spec{Workers: 1}).withDefaults(); s.Name != DefaultName {
		t.Errorf("default name %q, want %q", s.Name, DefaultName)
	}
}
