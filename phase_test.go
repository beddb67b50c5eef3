//go:build linux

package ipcluster

import (
	"strings"
	"testing"
)

// evUnknown is an event the loop has no case for: a new ev* type whose
// case was forgotten.
type evUnknown struct{}

func (evUnknown) isEvent() {}

// handle fails loudly on an event it does not know, naming its type,
// rather than dropping it.
func TestHandleUnknownEventPanics(t *testing.T) {
	m, _ := policyMaster(t, Config{Workers: 1})
	defer func() {
		r := recover()
		if s, _ := r.(string); !strings.Contains(s, "evUnknown") {
			t.Fatalf("handle(evUnknown{}): recovered %v, want a panic naming the type", r)
		}
	}()
	m.handle(evUnknown{})
}

// A worker being replaced still serves its slot and is reported as active:
// the status, events, metrics labels and ipclusterctl show no new state.
func TestReplacingReportedActive(t *testing.T) {
	if got := stateReplacing.String(); got != "active" {
		t.Errorf("stateReplacing reported as %q, want \"active\"", got)
	}
	if !stateReplacing.serving() || !stateActive.serving() || stateRetired.serving() || stateStandby.serving() {
		t.Error("serving: want active and replacing only")
	}
	m, _ := policyMaster(t, Config{Workers: 1})
	p := addProc(m, 1<<30, stateActive, 0, 0, 0)
	m.slots[0] = p
	m.pending[0] = addProc(m, 1<<30+1, stateStarting, 0, 0, 0) // its replacement: nothing is spawned
	m.retire(p, CauseReplaced, "test")
	if p.state != stateReplacing || p.retireCause != CauseReplaced {
		t.Fatalf("retired active worker: state %v cause %q, want replacing, replaced", p.state, p.retireCause)
	}
	m.retire(p, CauseMemory, "again")
	if p.retireCause != CauseReplaced {
		t.Errorf("a replacing worker was retired again: cause %q", p.retireCause)
	}
}
