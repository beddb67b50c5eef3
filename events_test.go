//go:build linux

package ipcluster_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
)

// loggedEvent is one line of a spec.EventsLog: the event's Go type name
// ("EventStats"), when the master received it, and the event as JSON (an
// error field as its message). decodeEvent turns Event back into its type.
type loggedEvent struct {
	Type  string          `json:"type"`
	At    time.Time       `json:"at"`
	Event json.RawMessage `json:"event"`
}

// readEvents reads an events log: nothing if the master has not created it
// yet, and never a last line that is still being written.
func readEvents(t testing.TB, path string) []loggedEvent {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatalf("events log: %v", err)
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	var evs []loggedEvent
	for n, line := range bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var e loggedEvent
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatalf("events log %s line %d %q: %v", path, n+1, line, err)
		}
		evs = append(evs, e)
	}
	return evs
}

// waitEvent polls the events log every 20ms until ok accepts an event, and
// returns it. ok sees each event once, in the order logged. On timeout the
// test fails with a count of the events seen, by type.
func waitEvent(t testing.TB, path string, timeout time.Duration, ok func(loggedEvent) bool) loggedEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	seen := 0
	for {
		evs := readEvents(t, path)
		for _, e := range evs[seen:] {
			if ok(e) {
				return e
			}
		}
		seen = len(evs)
		if time.Now().After(deadline) {
			t.Fatalf("no matching event within %s; the log has %s", timeout, summarizeEvents(evs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// summarizeEvents counts events by type, in order of first appearance:
// "3 events: EventWorkerReady×2, EventReady×1".
func summarizeEvents(evs []loggedEvent) string {
	var order []string
	count := map[string]int{}
	for _, e := range evs {
		if count[e.Type] == 0 {
			order = append(order, e.Type)
		}
		count[e.Type]++
	}
	parts := make([]string, len(order))
	for i, typ := range order {
		parts[i] = fmt.Sprintf("%s×%d", typ, count[typ])
	}
	return fmt.Sprintf("%d events: %s", len(evs), strings.Join(parts, ", "))
}

// decodeEvent decodes a logged event as T, e.g. ipcluster.EventRetired.
// (EventRulesFailed, whose Err is logged as a string, cannot be decoded as
// itself: use a struct{ Err string }.)
func decodeEvent[T any](t testing.TB, e loggedEvent) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(e.Event, &v); err != nil {
		t.Fatalf("decode %s %s as %T: %v", e.Type, e.Event, v, err)
	}
	return v
}

// hasEvent reports whether the events log holds an event of type typ.
func hasEvent(t testing.TB, path, typ string) bool {
	t.Helper()
	return countEvents(t, path, typ) > 0
}

// countEvents is the number of events of type typ in the log at path.
func countEvents(t testing.TB, path, typ string) int {
	t.Helper()
	n := 0
	for _, e := range readEvents(t, path) {
		if e.Type == typ {
			n++
		}
	}
	return n
}

// The events log's format, without a cluster: every event a line, error
// fields as their message, and a line still being written left for later.
func TestEventsLogFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.jsonl")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	log := logEvents(f)
	log(ipcluster.EventRulesFailed{Err: fmt.Errorf("write: %w", ipcluster.ErrRulesLost)})
	log(ipcluster.EventRulesFailed{})
	log(ipcluster.EventRetired{PID: 7, Slot: 1, Replacement: 8, Reason: "test"})
	log(ipcluster.EventStats{At: time.Now(), Workers: []ipcluster.WorkerStats{{PID: 7, RSSBytes: 1 << 20, Lag: time.Millisecond}}})
	if _, err := f.WriteString(`{"type":"EventReady","at":`); err != nil {
		t.Fatal(err)
	}
	evs := readEvents(t, path)
	if got := summarizeEvents(evs); got != "4 events: EventRulesFailed×2, EventRetired×1, EventStats×1" {
		t.Fatalf("read %s", got)
	}
	type rulesFailed struct{ Err *string }
	if rf := decodeEvent[rulesFailed](t, evs[0]); rf.Err == nil || *rf.Err != "write: "+ipcluster.ErrRulesLost.Error() {
		t.Errorf("EventRulesFailed logged as %s", evs[0].Event)
	}
	if rf := decodeEvent[rulesFailed](t, evs[1]); rf.Err != nil {
		t.Errorf("EventRulesFailed without an error logged as %s", evs[1].Event)
	}
	if r := decodeEvent[ipcluster.EventRetired](t, evs[2]); r != (ipcluster.EventRetired{PID: 7, Slot: 1, Replacement: 8, Reason: "test"}) {
		t.Errorf("EventRetired logged as %s", evs[2].Event)
	}
	if s := decodeEvent[ipcluster.EventStats](t, evs[3]); len(s.Workers) != 1 || s.Workers[0].Lag != time.Millisecond || s.At.IsZero() {
		t.Errorf("EventStats logged as %s", evs[3].Event)
	}
	for _, e := range evs {
		if time.Since(e.At) > time.Minute || time.Since(e.At) < 0 {
			t.Errorf("%s logged at %s", e.Type, e.At)
		}
	}
	e := waitEvent(t, path, time.Second, func(e loggedEvent) bool { return e.Type == "EventRetired" })
	if e.Type != "EventRetired" {
		t.Errorf("waitEvent returned %s", e.Type)
	}
	t.Logf("%s", evs[0].Event)
}
