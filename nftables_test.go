//go:build linux

package ipcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// nftLab is a lab and an nf_tables connection inside its server namespace.
func nftLab(t testing.TB, clients int) (*netlab.Lab, *nftables.Conn) {
	t.Helper()
	lab := netlab.NewT(t, netlab.Options{Clients: clients})
	conn, err := lab.Server.NFTables()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.CloseLasting() })
	return lab, conn
}

// portListeners stand in for workers' ports: listeners in the server
// namespace whose accepted connections arrive, tagged, on one channel.
type portListeners struct {
	port     []uint16
	accepted chan accepted
}

type accepted struct {
	i int
	c net.Conn
}

func listenN(t *testing.T, ns *netlab.NS, n int) *portListeners {
	t.Helper()
	p := &portListeners{accepted: make(chan accepted, 64)}
	for i := range n {
		ln, err := ns.Listen("tcp", ":0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		p.port = append(p.port, uint16(ln.Addr().(*net.TCPAddr).Port))
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				p.accepted <- accepted{i, c}
			}
		}()
	}
	return p
}

// reaches dials dst from src and reports which listener accepted it (-1:
// none within a second), with both ends of the connection, left open.
func reaches(t *testing.T, lab *netlab.Lab, src netip.Addr, dst netip.AddrPort, lns *portListeners) (int, net.Conn, net.Conn) {
	t.Helper()
	// 3s: past one SYN retransmission (1s), which a busy CI machine can
	// cost the first connection of a fresh namespace; a refused or
	// unrouted connection fails at once or never arrives either way.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := lab.Client.Dial(ctx, "tcp", src, dst)
	if err != nil {
		return -1, nil, nil
	}
	t.Cleanup(func() { c.Close() })
	for {
		select {
		case a := <-lns.accepted:
			t.Cleanup(func() { a.c.Close() })
			if a.c.RemoteAddr().String() == c.LocalAddr().String() {
				return a.i, c, a.c
			}
		case <-ctx.Done():
			return -1, c, nil
		}
	}
}

// The nftables writer routes each slot to its port in both families,
// swaps one slot without disturbing an established connection, holds in
// the kernel exactly what it believes, and leaves nothing after remove.
func TestNFTWriterRoutesAndSwaps(t *testing.T) {
	lab, conn := nftLab(t, 8)
	r := testRouting(t, Config{Name: "nft", Workers: 4, Ports: []Port{{Public: 8080}, {Public: 8443}}})
	w := newNFTWriter(r, conn)
	lns := listenN(t, lab.Server, 5)
	ts := make([]slotTarget, 4)
	for s := range ts {
		ts[s] = slotTarget{tcp8080: lns.port[s], tcp8443: lns.port[s]}
	}
	ctx := context.Background()
	if err := w.apply(ctx, ts, ts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.remove(ctx) })

	for i := range 4 {
		for _, dst := range []netip.AddrPort{
			netip.AddrPortFrom(lab.ServerAddr4, 8080), netip.AddrPortFrom(lab.ServerAddr4, 8443),
		} {
			if got, _, _ := reaches(t, lab, lab.ClientAddrs4[i], dst, lns); got != i {
				t.Errorf("IPv4 client %s to %s reached listener %d, want slot %d's", lab.ClientAddrs4[i], dst, got, i)
			}
		}
		if got, _, _ := reaches(t, lab, lab.ClientAddrs6[i], netip.AddrPortFrom(lab.ServerAddr6, 8080), lns); got != i {
			t.Errorf("IPv6 client %s reached listener %d, want slot %d's", lab.ClientAddrs6[i], got, i)
		}
	}
	// A public port the cluster does not serve is not translated.
	if got, _, _ := reaches(t, lab, lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 9999), lns); got != -1 {
		t.Errorf("port 9999 reached listener %d; want no route", got)
	}
	checkNFTKernel(t, conn, w)

	// Slot 1 moves to listener 4; a connection made before keeps working.
	_, oldClient, oldServer := reaches(t, lab, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, 8080), lns)
	before := w.changes()
	ts[1] = slotTarget{tcp8080: lns.port[4], tcp8443: lns.port[4]}
	if err := w.apply(ctx, ts, ts); err != nil {
		t.Fatal(err)
	}
	if n := w.changes() - before; n != 1 {
		t.Errorf("a slot swap took %d netlink transactions, want 1", n)
	}
	if got, _, _ := reaches(t, lab, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, 8080), lns); got != 4 {
		t.Errorf("after the swap slot 1 reached listener %d, want 4", got)
	}
	if got, _, _ := reaches(t, lab, lab.ClientAddrs6[1], netip.AddrPortFrom(lab.ServerAddr6, 8443), lns); got != 4 {
		t.Errorf("after the swap IPv6 slot 1 reached listener %d, want 4", got)
	}
	echoOnce(t, oldClient, oldServer)
	checkNFTKernel(t, conn, w)

	// A slot losing its worker loses its routes; the rest keep theirs.
	ts[2] = nil
	if err := w.apply(ctx, ts, ts); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := reaches(t, lab, lab.ClientAddrs4[2], netip.AddrPortFrom(lab.ServerAddr4, 8080), lns); got != -1 {
		t.Errorf("slot 2 without a worker reached listener %d", got)
	}
	checkNFTKernel(t, conn, w)

	// A stopping master withdraws every route first: no new connection is
	// routed, established ones keep working until their workers finish.
	if err := w.apply(ctx, make([]slotTarget, 4), ts); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := reaches(t, lab, lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 8080), lns); got != -1 {
		t.Errorf("with every route withdrawn, slot 0 reached listener %d", got)
	}
	echoOnce(t, oldClient, oldServer)

	if err := w.remove(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.remove(ctx); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	if exists, err := w.exists(); err != nil || exists {
		t.Fatalf("table still exists after remove (err %v)", err)
	}
}

// echoOnce checks that an established connection still carries data both
// ways.
func echoOnce(t *testing.T, client, server net.Conn) {
	t.Helper()
	_ = client.SetDeadline(time.Now().Add(time.Second))
	_ = server.SetDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 4)
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatalf("established connection: write: %v", err)
	}
	if _, err := server.Read(buf); err != nil || string(buf) != "ping" {
		t.Fatalf("established connection: server read %q, %v", buf, err)
	}
	if _, err := server.Write([]byte("pong")); err != nil {
		t.Fatalf("established connection: server write: %v", err)
	}
	if _, err := client.Read(buf); err != nil || string(buf) != "pong" {
		t.Fatalf("established connection: client read %q, %v", buf, err)
	}
}

// checkNFTKernel compares each family's map in the kernel with the
// writer's belief.
func checkNFTKernel(t *testing.T, conn *nftables.Conn, w *nftWriter) {
	t.Helper()
	for _, f := range w.r.families {
		elems, err := conn.GetSetElements(w.set(f))
		if err != nil {
			t.Fatalf("read %s map: %v", f.name, err)
		}
		var got, want []string
		for _, e := range elems {
			got = append(got, string(e.Key)+"="+string(e.Val))
		}
		for k, v := range w.installed {
			want = append(want, string(w.keyBytes(f, k))+"="+string([]byte{byte(v >> 8), byte(v)}))
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s map in the kernel has %d elements that differ from the %d the writer believes in", f.name, len(got), len(want))
		}
	}
}

// A new master finds a crashed master's table and replaces it whole in its
// first transaction.
func TestNFTWriterReplacesStaleTable(t *testing.T) {
	lab, conn := nftLab(t, 4)
	r := testRouting(t, Config{Name: "nft", Workers: 2, Ports: []Port{{Public: 8080}}, Addr: lab.ServerAddr4})
	lns := listenN(t, lab.Server, 3)
	ctx := context.Background()
	crashed := newNFTWriter(r, conn)
	if err := crashed.apply(ctx, []slotTarget{{tcp8080: lns.port[0]}, {tcp8080: lns.port[1]}}, nil); err != nil {
		t.Fatal(err)
	}
	w := newNFTWriter(r, conn)
	t.Cleanup(func() { _ = w.remove(ctx) })
	if err := w.apply(ctx, []slotTarget{{tcp8080: lns.port[2]}, {tcp8080: lns.port[2]}}, nil); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if got, _, _ := reaches(t, lab, lab.ClientAddrs4[i], netip.AddrPortFrom(lab.ServerAddr4, 8080), lns); got != 2 {
			t.Errorf("client %d reached listener %d, want the new master's 2", i, got)
		}
	}
	// Addr is IPv4: no IPv6 map, and IPv6 clients are not translated.
	if _, err := conn.GetSetElements(w.set(familyIPv6)); err == nil {
		t.Error("an IPv4-only cluster has an IPv6 map")
	}
	checkNFTKernel(t, conn, w)
}

// failedNFTUpdate writes a cluster's table, deletes it behind the writer's
// back (as an operator's nft flush ruleset would) and returns the writer
// and the error of its next update, which must fail rather than pretend.
func failedNFTUpdate(t *testing.T) (*nftWriter, error) {
	t.Helper()
	_, conn := nftLab(t, 1)
	r := testRouting(t, Config{Name: "nft", Workers: 2, Ports: []Port{{Public: 8080}}})
	w := newNFTWriter(r, conn)
	ctx := context.Background()
	if err := w.apply(ctx, []slotTarget{{tcp8080: 1000}, {tcp8080: 1001}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := w.remove(ctx); err != nil {
		t.Fatal(err)
	}
	w.installed = map[nftKey]uint16{{slot: 0, proto: 6, port: 8080}: 1000}
	return w, w.apply(ctx, []slotTarget{{tcp8080: 2000}, nil}, nil)
}

// A failed transaction leaves the writer's belief as it was, so the
// master's retry starts from what the kernel holds.
func TestNFTWriterFailureKeepsBelief(t *testing.T) {
	w, err := failedNFTUpdate(t)
	if err == nil {
		t.Fatal("updating a table that does not exist succeeded")
	}
	if got := w.installed[nftKey{slot: 0, proto: 6, port: 8080}]; got != 1000 || len(w.installed) != 1 {
		t.Errorf("after a failed update the writer believes in %v, want the old route to 1000", w.installed)
	}
}

// A failed nf_tables request is an *NFTablesError naming what was being
// done and the table, and it unwraps to the kernel's answer.
func TestNFTWriterErrorTyped(t *testing.T) {
	_, failed := failedNFTUpdate(t)
	err := fmt.Errorf("sync rules: %w", failed)
	var ne *NFTablesError
	if !errors.As(err, &ne) {
		t.Fatalf("updating a table that does not exist: %v (%T), want an *NFTablesError", err, errors.Unwrap(err))
	}
	if ne.Op != "update routes in" || ne.Family != "inet" || ne.Table != "ipcluster-nft" || ne.Set != "" {
		t.Errorf("error %+v, want op \"update routes in\" of table inet ipcluster-nft", ne)
	}
	if !errors.Is(err, unix.ENOENT) {
		t.Errorf("error %v does not unwrap to the kernel's ENOENT", err)
	}
	if want := "update routes in nf_tables table inet ipcluster-nft: "; !strings.HasPrefix(ne.Error(), want) {
		t.Errorf("error text %q, want it to start %q", ne.Error(), want)
	}
}

// NFTablesError's text names the map when the request was about one, and
// only the operation when no table was involved.
func TestNFTablesErrorText(t *testing.T) {
	for _, tc := range []struct {
		err  *NFTablesError
		want string
	}{
		{&NFTablesError{Op: "read ipv4 map", Family: "inet", Table: "ipcluster-chat", Set: "slots4", Err: unix.ENOENT},
			"read ipv4 map slots4 of nf_tables table inet ipcluster-chat: no such file or directory"},
		{&NFTablesError{Op: "delete", Family: "inet", Table: "ipcluster-chat", Err: unix.EPERM},
			"delete nf_tables table inet ipcluster-chat: operation not permitted"},
		{&NFTablesError{Op: "open nf_tables netlink socket", Err: unix.EPROTONOSUPPORT},
			"open nf_tables netlink socket: protocol not supported"},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
		if !errors.Is(tc.err, tc.err.Err) {
			t.Errorf("%v does not unwrap to %v", tc.err, tc.err.Err)
		}
	}
}

// The probe that picks the backend checks the whole table with the kernel
// and leaves nothing behind.
func TestNFTProbeLeavesNothing(t *testing.T) {
	_, conn := nftLab(t, 1)
	r := testRouting(t, Config{Name: "nft", Workers: 256, Ports: []Port{{Public: 8080}, {Public: 8443}}})
	if err := nftProbe(conn, r); err != nil {
		t.Fatal(err)
	}
	tables, err := conn.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		t.Errorf("table %s left by the probe", tb.Name)
	}
}

// Unless AllowDirect, a worker's own port refuses new connections that did
// not come through the routes, from other hosts and from this one, while
// routed ones and established ones work; a port that leaves the set is
// open again. With AllowDirect nothing is refused.
func TestNFTGuardRefusesDirect(t *testing.T) {
	for _, allow := range []bool{false, true} {
		t.Run(fmt.Sprintf("AllowDirect=%v", allow), func(t *testing.T) {
			lab, conn := nftLab(t, 2)
			r := testRouting(t, Config{Name: "nft", Workers: 1, Ports: []Port{tcp8080}, AllowDirect: allow})
			w := newNFTWriter(r, conn)
			lns := listenN(t, lab.Server, 2)
			ctx := context.Background()
			ts := []slotTarget{{tcp8080: lns.port[0]}}
			workers := []slotTarget{{tcp8080: lns.port[0]}, {tcp8080: lns.port[1]}} // 1: a retired worker
			if err := w.apply(ctx, ts, workers); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = w.remove(ctx) })

			if got, _, _ := reaches(t, lab, lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 8080), lns); got != 0 {
				t.Fatalf("routed connection reached listener %d, want 0", got)
			}
			for i, port := range lns.port {
				got, _, _ := reaches(t, lab, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, port), lns)
				if allow && got != i {
					t.Errorf("AllowDirect: a direct connection to worker port %d reached %d", port, got)
				}
				if !allow && got != -1 {
					t.Errorf("a direct connection to worker port %d was let through to listener %d", port, got)
				}
				// From this host too: the nat output path does not route it.
				err := lab.Server.Do(func() error {
					c, err := net.DialTimeout("tcp", netip.AddrPortFrom(lab.ServerAddr4, port).String(), time.Second)
					if err == nil {
						c.Close()
					}
					return err
				})
				if allow == (err != nil) {
					t.Errorf("local direct connection to worker port %d: %v (AllowDirect %v)", port, err, allow)
				}
			}
			if allow {
				return
			}
			// The retired worker exits: its port is no longer refused.
			if err := w.apply(ctx, ts, workers[:1]); err != nil {
				t.Fatal(err)
			}
			if got, _, _ := reaches(t, lab, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, lns.port[1]), lns); got != 1 {
				t.Errorf("a port that left the guard set still refused (reached %d)", got)
			}
		})
	}
}
