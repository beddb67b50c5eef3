//go:build linux

package ipcluster

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// handoffPair hands over from a worker whose callback is fn, with the
// writer's bounds, and reads with the reader's: the two ends of a state
// handoff without a master.
func handoffPair(t *testing.T, fn func(io.Writer) error, writeMax, readMax int64, timeout time.Duration) ([]byte, error) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The writer's own deadline comes well after the reader's, which the
	// test is about: in a cluster the reader's clock starts first, at
	// its request.
	old := &Worker{cfg: &Config{HandoffTimeout: timeout + 10*time.Second, HandoffMaxBytes: writeMax}, log: slog.New(slog.DiscardHandler)}
	old.OnHandoff(fn)
	// Not waited for: a callback that blocks never returns (its worker
	// goes on without it).
	go old.handOver(&proto.Handoff{Slot: 1, To: 2}, fds[0])
	return readHandoff(fds[1], 1, time.Now().Add(timeout), timeout, readMax)
}

// The stream's framing: a whole state arrives whole, over many chunks; no
// callback is an empty state; a callback's error or panic, a state over
// either side's HandoffMaxBytes, a callback that blocks past
// HandoffTimeout, and a stream cut before its end marker are errors, each
// naming what to do, never a truncated state taken as whole.
func TestHandoffStream(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 40_000) // 640 KB: ten chunks
	write := func(b []byte) func(io.Writer) error {
		return func(w io.Writer) error {
			// In pieces, as an encoder writes.
			for len(b) > 0 {
				n := min(len(b), 1000)
				if _, err := w.Write(b[:n]); err != nil {
					return err
				}
				b = b[n:]
			}
			return nil
		}
	}
	const mib = 1 << 20
	for _, tc := range []struct {
		name              string
		fn                func(io.Writer) error
		writeMax, readMax int64
		timeout           time.Duration
		want              []byte
		wantErr           string // "" for none
	}{
		{name: "whole", fn: write(big), writeMax: mib, readMax: mib, want: big},
		{name: "none", fn: nil, writeMax: mib, readMax: mib, want: nil},
		{name: "empty", fn: write(nil), writeMax: mib, readMax: mib, want: nil},
		{name: "error", fn: func(w io.Writer) error {
			w.Write([]byte("half a state"))
			return errors.New("encode sessions: boom")
		}, writeMax: mib, readMax: mib, wantErr: "could not write its state: encode sessions: boom"},
		{name: "panic", fn: func(io.Writer) error { panic("bug") }, writeMax: mib, readMax: mib, wantErr: "OnHandoff panicked: bug"},
		{name: "writer limit", fn: write(big), writeMax: 100_000, readMax: mib, wantErr: "exceeds Config.HandoffMaxBytes (100000 bytes)"},
		{name: "reader limit", fn: write(big), writeMax: mib, readMax: 100_000, wantErr: "exceeds Config.HandoffMaxBytes (100000 bytes)"},
		{name: "blocks", fn: func(io.Writer) error { select {} }, writeMax: mib, readMax: mib, timeout: 200 * time.Millisecond,
			wantErr: "did not end within Config.HandoffTimeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.timeout == 0 {
				tc.timeout = 10 * time.Second
			}
			got, err := handoffPair(t, tc.fn, tc.writeMax, tc.readMax, tc.timeout)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("error %v, want none", err)
			case tc.wantErr != "" && (err == nil || !errors.Is(err, ErrHandoff) || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("error %v, want ErrHandoff saying %q", err, tc.wantErr)
			case tc.wantErr == "" && !bytes.Equal(got, tc.want):
				t.Fatalf("got %d bytes, want %d", len(got), len(tc.want))
			}
			if err != nil {
				t.Logf("%v", err)
			}
		})
	}

	// A stream that ends without its end marker (the old worker died)
	// is an error, whatever it carried.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Write(fds[0], []byte{0, 0, 0, 3, 'a', 'b', 'c'})
	unix.Close(fds[0])
	if _, err := readHandoff(fds[1], 7, time.Now().Add(10*time.Second), 10*time.Second, mib); err == nil || !strings.Contains(err.Error(), "closed the handoff before the end") {
		t.Errorf("a stream cut before its end: %v, want an error saying so", err)
	}
}

// Owns uses the routes' slot arithmetic: the low bits below the slot
// prefix, for the slot count the worker knows.
func TestWorkerOwns(t *testing.T) {
	w := &Worker{slot: 2, cfg: &Config{IPv4SlotPrefix: 24, IPv6SlotPrefix: 64}}
	w.handoff.workers.Store(4)
	for addr, want := range map[string]bool{
		"198.18.2.9":                 true, // 2 in the low bits of the /24
		"198.18.6.200":               true,
		"198.18.3.2":                 false,
		"::ffff:198.18.2.1":          true, // as a dual-stack socket names an IPv4 client
		"2001:db8:0:2::1":            true, // low bits of the /64
		"2001:db8:0:1::2":            false,
		"2001:db8:0:6:ffff:ffff::ff": true,
	} {
		if got := w.Owns(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Owns(%s) = %v, want %v", addr, got, want)
		}
	}
	w.handoff.workers.Store(2) // after a shrink, slot 2 is no one's
	if w.Owns(netip.MustParseAddr("198.18.2.9")) {
		t.Error("slot 2 of 2 owns an address")
	}
}

// Each EventHandoff counts in ipcluster_handoffs_total, by outcome.
func TestHandoffMetric(t *testing.T) {
	o := newObserver(slog.New(slog.DiscardHandler))
	o.event(EventHandoff{Slot: 1, From: 10, To: 11, Bytes: 5})
	o.event(EventHandoff{Slot: 1, From: 11, To: 12, Err: "timeout"})
	o.event(EventHandoff{Slot: 0, From: 13, To: 14, Bytes: 7})
	for outcome, want := range map[string]float64{"ok": 2, "failed": 1} {
		var m dto.Metric
		if err := o.handoffs.WithLabelValues(outcome).Write(&m); err != nil {
			t.Fatal(err)
		}
		if got := m.GetCounter().GetValue(); got != want {
			t.Errorf("ipcluster_handoffs_total{outcome=%q} = %v, want %v", outcome, got, want)
		}
	}
}
