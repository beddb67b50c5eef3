//go:build linux

package netlab

import (
	"context"
	"io"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// A client reaches the service address on the host the router's route
// names, from its own address, and the host answers it back; with a
// multipath route over every host each client address sticks to one.
func TestFabric(t *testing.T) {
	f := NewFabricT(t, FabricOptions{Hosts: 3, Clients: 64})
	if len(f.Hosts) != 3 || len(f.ClientAddrs4) != 64 || f.ClientAddrs4[63] != netip.MustParseAddr("198.18.4.63") {
		t.Fatalf("fabric: %d hosts, clients %v", len(f.Hosts), f.ClientAddrs4[len(f.ClientAddrs4)-1])
	}
	// Each host says who it is, and who it sees.
	for i, h := range f.Hosts {
		ln, err := h.NS.Listen("tcp4", netip.AddrPortFrom(f.ServiceAddr4, 80).String())
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = io.WriteString(c, string(rune('0'+i))+" "+c.RemoteAddr().String())
				c.Close()
			}
		}()
	}
	ask := func(src netip.Addr) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		c, err := f.Client.Dial(ctx, "tcp4", src, netip.AddrPortFrom(f.ServiceAddr4, 80))
		if err != nil {
			t.Fatalf("dial from %s: %v", src, err)
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if gws, err := f.ServiceRoute(); err != nil || len(gws) != 0 {
		t.Fatalf("route before any: %v %v", gws, err)
	}
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", f.Router.Name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	ip("route", "add", f.ServiceAddr4.String()+"/32", "via", f.Hosts[1].Addr4.String())
	if got := ask(f.ClientAddrs4[5]); got != "1 198.18.4.5:"+strings.Split(got, ":")[1] {
		t.Fatalf("host 1 answered %q", got)
	}
	ip("route", "replace", f.ServiceAddr4.String()+"/32",
		"nexthop", "via", f.Hosts[0].Addr4.String(), "nexthop", "via", f.Hosts[1].Addr4.String(), "nexthop", "via", f.Hosts[2].Addr4.String())
	gws, err := f.ServiceRoute()
	if err != nil || len(gws) != 3 || f.HostOf(gws[2]) != f.Hosts[2] {
		t.Fatalf("multipath route: %v %v", gws, err)
	}
	seen := map[byte]bool{}
	for _, src := range f.ClientAddrs4 {
		a, b := ask(src), ask(src)
		if a[0] != b[0] {
			t.Errorf("client %s reached host %c, then %c", src, a[0], b[0])
		}
		seen[a[0]] = true
	}
	if len(seen) != 3 {
		t.Errorf("64 clients reached hosts %v, want all 3", seen)
	}
}
