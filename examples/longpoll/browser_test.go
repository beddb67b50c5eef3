//go:build linux

package main

// The example's own HTML client in real browsers (headless Chromium in the
// lab's client namespace, internal/browser) across a deploy: needs root
// and Chromium.

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/browser"
	"github.com/ipcluster/ipcluster/internal/examplelab"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// page is one browser window on the chat.
type page struct {
	name, nick string
	src        netip.Addr
	longPoll   bool // the page's long-poll mode rather than its SSE stream
	b          *browser.Browser
	first      whoamiReply // before joining

	mu     sync.Mutex
	sent   map[string]uint64 // text -> seq, of the sends the server took
	failed []string          // the sends that failed, with why
}

// domMessage is a message line of the page's log, as the page shows it.
type domMessage struct {
	Seq  uint64 `json:"seq"`
	From string `json:"from"`
	Text string `json:"text"`
}

// domConnection is a "connected" line: the page reached a worker.
type domConnection struct {
	PID      int    `json:"pid"`
	Version  string `json:"version"`
	Rejoined bool   `json:"rejoined"`
	At       int64  `json:"at"` // ms since the epoch, by the browser's clock
}

// waitJS is a JavaScript promise that resolves once cond (an expression)
// is true, or rejects after ms milliseconds, naming what it waited for.
func waitJS(cond, what string, ms int) string {
	return fmt.Sprintf(`new Promise((ok, fail) => {
  const t0 = Date.now();
  (function check() {
    if (%s) ok(true);
    else if (Date.now() - t0 > %d) fail(new Error(%q + " not seen in %dms; the log ends with: " + document.getElementById("log").innerText.slice(-3000)));
    else setTimeout(check, 50);
  })();
})`, cond, ms, what, ms)
}

const (
	jsMessages = `[...document.querySelectorAll("#log .msg")].map(d => ({seq: +d.dataset.seq, from: d.dataset.from,
  text: d.textContent.slice(("[" + d.dataset.room + "] " + d.dataset.from + ": ").length)}))`
	jsConnections = `[...document.querySelectorAll("#log .connected")].map(d => ({pid: +d.dataset.pid, version: d.dataset.version,
  rejoined: d.dataset.rejoined === "true", at: +d.dataset.at}))`
	jsWhoami = `fetch("/whoami").then(r => r.json())`
)

// Three pages of the example's own client (index.html) in three browsers:
// ann and cat from addresses of the same slot, so in the same room of the
// same worker, over server-sent events; bob from the other slot, in the
// page's long-poll mode. They
// join through the page's form and talk (say, the page's own send) while
// the master deploys a new build (SIGHUP). Afterwards each page's log
// shows every message its room's pages sent, each exactly once; each page
// moved to its slot's new worker with at most one reconnection, its
// session there as before (same nickname, not re-joined from the cookie),
// answered by the new build.
func TestBrowserAcrossDeploy(t *testing.T) {
	browser.Chromium(t)
	lab := netlab.NewT(t, netlab.Options{Clients: 8})
	// -sse-grace 4s: a retired worker's streams close 2s to 4s after its
	// retirement, so the pages move within the test's time.
	cl := examplelab.Start(t, lab, t.TempDir(), "lp", "-workers", "2", "-port", "8080", "-addr", lab.ServerAddr4.String(), "-sse-grace", "4s")
	// The next build now, not during the deploy, which the test wants
	// short.
	cl.BuildNext("-X main.deployTestBuild=browser")
	st0 := cl.Wait("the cluster ready", func(st *proto.Status) bool { return st.Ready })
	base := "http://" + netip.AddrPortFrom(lab.ServerAddr4, 8080).String()

	// Slots are the addresses' low bit (2 workers): .2 and .4 share one,
	// .3 has the other.
	pages := []*page{
		{name: "A", nick: "ann", src: lab.ClientAddrs4[2]},
		{name: "B", nick: "bob", src: lab.ClientAddrs4[3], longPoll: true},
		{name: "C", nick: "cat", src: lab.ClientAddrs4[4]},
	}
	for _, p := range pages {
		p.sent = map[string]uint64{}
		p.b = browser.Start(t, lab, browser.Options{Src: p.src})
		if err := p.b.Navigate(base + "/"); err != nil {
			t.Fatal(err)
		}
		if err := p.b.Eval(jsWhoami, &p.first); err != nil {
			t.Fatal(err)
		}
		if p.first.Session != nil {
			t.Fatalf("page %s has a session before joining: %+v", p.name, p.first.Session)
		}
	}
	A, B, C := pages[0], pages[1], pages[2]
	if A.first.Slot != C.first.Slot || A.first.Slot == B.first.Slot || A.first.PID != C.first.PID {
		t.Fatalf("slots: A (%v) %d pid %d, B (%v) %d, C (%v) %d pid %d; want A and C on one worker, B on the other",
			A.src, A.first.Slot, A.first.PID, B.src, B.first.Slot, C.src, C.first.Slot, C.first.PID)
	}
	room := map[*page][]*page{A: {A, C}, B: {B}, C: {A, C}} // whose messages each page must show

	// Join through the page's form, as a user would, and wait for the
	// stream to connect.
	for _, p := range pages {
		// A stream says hello at once; a long-poll answers once there is
		// a message, so for that page the join's answer will do.
		joined := `document.querySelector("#log .connected")`
		if p.longPoll {
			joined = `document.getElementById("who").dataset.pid`
		}
		js := `(() => {
  const f = document.getElementById("join");
  f.elements.nick.value = ` + strconv.Quote(p.nick) + `;
  f.elements.room.value = "lobby";
  document.getElementById("longpoll").checked = ` + strconv.FormatBool(p.longPoll) + `;
  f.requestSubmit();
  return ` + waitJS(joined, "the join's answer", 15000) + `;
})()`
		if err := p.b.Eval(js, nil); err != nil {
			t.Fatalf("page %s: join: %v", p.name, err)
		}
	}

	say := func(p *page, text string) {
		var m message
		err := p.b.Eval(`say(`+strconv.Quote(text)+`)`, &m)
		p.mu.Lock()
		defer p.mu.Unlock()
		switch {
		case err != nil:
			p.failed = append(p.failed, text+": "+err.Error())
		case m.Text != text || m.From != p.nick:
			p.failed = append(p.failed, fmt.Sprintf("%s: stored as %+v", text, m))
		default:
			p.sent[text] = m.Seq
		}
	}
	// waitShown waits until p's log shows every message its room sent, for
	// up to 45s: a long-poll open on a retired worker answers only when
	// its 25s are up (see server.drain), and only the page's next poll
	// reaches the new worker.
	waitShown := func(p *page) {
		t.Helper()
		var want []string
		for _, q := range room[p] {
			q.mu.Lock()
			for text := range q.sent {
				want = append(want, strconv.Quote(text))
			}
			q.mu.Unlock()
		}
		// Each Eval waits up to 10s, well within its own 30s bound.
		js := `(() => { const want = [` + strings.Join(want, ",") + `];
  return ` + waitJS(`(() => { const have = new Set(`+jsMessages+`.map(m => m.text)); return want.every(w => have.has(w)); })()`,
			"every message of the room", 10000) + `; })()`
		var err error
		for deadline := time.Now().Add(45 * time.Second); time.Now().Before(deadline); {
			if err = p.b.Eval(js, nil); err == nil {
				return
			}
		}
		t.Errorf("page %s: %v", p.name, err)
	}

	// Before the deploy: each says hello, and the room's pages see each
	// other's.
	for _, p := range pages {
		say(p, p.name+"-0")
	}
	for _, p := range pages {
		waitShown(p)
	}
	if t.Failed() {
		t.FailNow()
	}

	// The pages keep talking, each at most 150 messages, some 5 a second,
	// through the whole deploy and a moment after.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range pages {
		wg.Go(func() {
			for i := 1; i <= 150; i++ {
				select {
				case <-stop:
					return
				case <-time.After(200 * time.Millisecond):
				}
				say(p, fmt.Sprintf("%s-%d", p.name, i))
			}
		})
	}
	stopped := false
	stopTalking := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer stopTalking()

	time.Sleep(time.Second) // some messages to the old workers first
	_, deployed := cl.Deploy()
	st := cl.Wait("the deploy committed, every slot on the new build", func(st *proto.Status) bool {
		if st.MasterPID == st0.MasterPID || !st.Ready || st.DeployPhase != proto.PhaseCommitted || st.Build == st0.Build {
			return false
		}
		build := map[int]string{}
		for _, w := range st.Workers {
			build[w.PID] = w.Build
		}
		for _, s := range st.Slots {
			if s.Active == 0 || build[s.Active] != st.Build {
				return false
			}
		}
		return true
	})
	took := time.Since(deployed)
	active := map[int]int{} // slot -> its new worker
	for _, s := range st.Slots {
		active[s.Slot] = s.Active
	}
	time.Sleep(2 * time.Second) // and some to the new ones
	stopTalking()

	for _, p := range pages {
		waitShown(p)
	}
	for _, p := range pages {
		var shown []domMessage
		if err := p.b.Eval(jsMessages, &shown); err != nil {
			t.Fatal(err)
		}
		var conns []domConnection
		if err := p.b.Eval(jsConnections, &conns); err != nil {
			t.Fatal(err)
		}
		var who whoamiReply
		if err := p.b.Eval(jsWhoami, &who); err != nil {
			t.Fatal(err)
		}

		// Every message of the room exactly once, nothing else.
		count := map[string]int{}
		for _, m := range shown {
			count[m.Text]++
		}
		expected := 0
		for _, q := range room[p] {
			q.mu.Lock()
			for text, seq := range q.sent {
				expected++
				switch n := count[text]; {
				case n == 0:
					t.Errorf("page %s: %s's message %q (seq %d) lost", p.name, q.name, text, seq)
				case n > 1:
					t.Errorf("page %s: %s's message %q (seq %d) shown %d times", p.name, q.name, text, seq, n)
				}
				delete(count, text)
			}
			q.mu.Unlock()
		}
		for text, n := range count {
			t.Errorf("page %s: shows %q %d times, which its room's pages did not send (or failed to)", p.name, text, n)
		}

		// Moved to its slot's new worker, at most once, session intact.
		newWorker := active[p.first.Slot]
		switch s := who.Session; {
		case who.PID != newWorker || who.Version == p.first.Version:
			t.Errorf("page %s: /whoami after the deploy answered by pid %d version %s; want the new worker %d, not version %s",
				p.name, who.PID, who.Version, newWorker, p.first.Version)
		case s == nil || s.Nick != p.nick || s.Rejoined || strings.Join(s.Rooms, ",") != "lobby":
			t.Errorf("page %s: session after the deploy %+v; want %s in lobby, not re-joined", p.name, s, p.nick)
		}
		reconnections := len(conns) - 1
		firstNew := time.Duration(-1)
		for _, c := range conns {
			if c.Rejoined {
				t.Errorf("page %s: the stream to pid %d re-joined the session from the cookie", p.name, c.PID)
			}
			if c.PID == newWorker && firstNew < 0 {
				firstNew = time.UnixMilli(c.At).Sub(deployed)
			}
		}
		if len(conns) == 0 || conns[len(conns)-1].PID != newWorker || reconnections > 1 {
			t.Errorf("page %s: connections %+v; want one to the old worker %d, then one to the new %d", p.name, conns, p.first.PID, newWorker)
		}

		p.mu.Lock()
		t.Logf("page %s (%s from %v, slot %d): sent %d (%d failed), shows %d of the room's %d; %d reconnection(s); first answer from the new worker (pid %d) %v after SIGHUP (the deploy took %v)",
			p.name, p.nick, p.src, p.first.Slot, len(p.sent), len(p.failed), len(shown), expected, reconnections, newWorker,
			firstNew.Round(time.Millisecond), took.Round(time.Millisecond))
		for _, f := range p.failed {
			t.Errorf("page %s: send %s", p.name, f)
		}
		p.mu.Unlock()
	}
	if dst := os.Getenv("IPCLUSTER_KEEP_SCREENSHOTS"); dst != "" {
		for _, p := range pages {
			if err := p.b.Screenshot(filepath.Join(dst, "longpoll-"+p.name+".png")); err != nil {
				t.Error(err)
			}
		}
	}
}
