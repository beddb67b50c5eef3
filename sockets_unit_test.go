//go:build linux

package ipcluster

import (
	"os"
	"testing"
)

// A slot's held sockets that a spare took over stay open when the worker
// that had been starting with them (killed: the spare was quicker) exits.
func TestHeldSocketsTakenBySpareStayOpen(t *testing.T) {
	m, _ := policyMaster(t, Config{Workers: 2})
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	held := &sockSet{ports: slotTarget{{Public: 1}: 40001}, files: []*os.File{r}}
	defer held.close()
	starting := addProc(m, 1<<30+1, stateStarting, 0, 0, 0) // slot 1
	starting.socks = held
	spare := addProc(m, 1<<30+3, stateActive, 0, 0, 0) // slot 1 too: given it, ready
	spare.socks = held
	m.slots[1] = spare
	delete(m.procs, starting.pid)
	m.releaseSockets(starting)
	if _, err := r.Stat(); err != nil {
		t.Fatalf("the spare's sockets were closed when the worker it replaced exited: %v", err)
	}
	if m.held[1] != nil || len(m.unrouted) != 0 {
		t.Errorf("held %v, unrouted %v: the sockets are the spare's, nobody else's", m.held[1], m.unrouted)
	}
}
