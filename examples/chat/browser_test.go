//go:build linux

package main

// The chat in real browsers across a deploy and a retirement: the
// example's binary as the master of a 2-worker cluster in a netlab lab,
// with TLS; two headless Chromium pages in the lab's client namespace,
// from addresses of different slots, typing into the page's own form;
// then a new build deployed with SIGHUP, and one slot's worker retired,
// while they type. What each page's DOM shows is checked at the end.

import (
	"bytes"
	"fmt"
	"image/png"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/browser"
	"github.com/ipcluster/ipcluster/internal/examplelab"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// page is one browser window of the test.
type page struct {
	nick string
	slot int
	b    *browser.Browser
	sent int
}

// pageStats is what the test reads from a page: window.chat.stats and the
// messages in its DOM.
type pageStats struct {
	Connects   int `json:"connects"`
	Sent       int `json:"sent"`
	Acked      int `json:"acked"`
	Received   int `json:"received"`
	Duplicates int `json:"duplicates"`
	Missed     int `json:"missed"`
	Welcomes   []struct {
		At      int64  `json:"at"`
		Slot    int    `json:"slot"`
		PID     int    `json:"pid"`
		Version string `json:"version"`
		Origin  string `json:"origin"`
		Remote  string `json:"remote"`
		Session string `json:"session"`
	} `json:"welcomes"`
	Closes []struct {
		At     int64  `json:"at"`
		Code   int    `json:"code"`
		Reason string `json:"reason"`
	} `json:"closes"`
	Errors  []string `json:"errors"`
	Session string   `json:"session"`
	Outbox  int      `json:"outbox"`
	IDs     []string `json:"ids"`  // the messages' ids in DOM order
	Seqs    []uint64 `json:"seqs"` // and their seqs
}

const readStats = `(() => {
	const lis = [...document.querySelectorAll("#log li[data-seq]")];
	return Object.assign({}, chat.stats, {session: chat.state.session, outbox: chat.state.outbox.length,
		ids: lis.map((l) => l.dataset.id), seqs: lis.map((l) => Number(l.dataset.seq))});
})()`

func (p *page) stats(t *testing.T) pageStats {
	t.Helper()
	var s pageStats
	if err := p.b.Eval(readStats, &s); err != nil {
		t.Fatalf("%s: %v", p.nick, err)
	}
	return s
}

// say types text into the page's form and sends it, as a user does.
func (p *page) say(t *testing.T, text string) {
	t.Helper()
	js := fmt.Sprintf(`(() => { const t = document.getElementById("text"); t.value = %q;
		document.getElementById("send").click(); return true; })()`, text)
	if err := p.b.Eval(js, nil); err != nil {
		t.Fatalf("%s types: %v", p.nick, err)
	}
	p.sent++
}

// waitPages polls until ok holds for every page's stats (at most a minute).
func waitPages(t *testing.T, what string, pages []*page, ok func(*page, pageStats) bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		all := true
		for _, p := range pages {
			if !ok(p, p.stats(t)) {
				all = false
				break
			}
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			for _, p := range pages {
				t.Logf("%s: %+v", p.nick, p.stats(t))
			}
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestBrowserChatAcrossDeploy(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 8})
	browser.Chromium(t) // skip (or fail, under IPCLUSTER_REQUIRE_TOOLS) before building anything
	dir := t.TempDir()
	certFile, keyFile, err := writeSelfSigned(dir, "chat test", []string{lab.ServerAddr4.String()})
	if err != nil {
		t.Fatal(err)
	}
	cl := examplelab.Start(t, lab, dir, "chat", "-workers", "2", "-port", "8443", "-addr", lab.ServerAddr4.String(),
		"-cert", certFile, "-key", keyFile, "-reconnect-spread", "1s")
	st0 := cl.Wait("the cluster ready", func(st *proto.Status) bool { return st.Ready })
	url := "https://" + lab.ServerAddr4.String() + ":8443/"
	cl.BuildNext("-X main.deployTestBuild=2")

	// 198.18.1.1 and 198.18.1.2: slots 1 and 0 of 2.
	pages := []*page{{nick: "ann", slot: 1}, {nick: "bob", slot: 0}}
	for i, p := range pages {
		src := lab.ClientAddrs4[1+i]
		p.b = browser.Start(t, lab, browser.Options{Src: src, IgnoreCertErrors: true, Width: 900, Height: 700})
		if err := p.b.Navigate(url); err != nil {
			t.Fatal(err)
		}
		js := fmt.Sprintf(`(() => { document.getElementById("nick").value = %q; document.getElementById("join").click(); return true; })()`, p.nick)
		if err := p.b.Eval(js, nil); err != nil {
			t.Fatal(err)
		}
		waitPages(t, p.nick+" joined", []*page{p}, func(_ *page, s pageStats) bool { return len(s.Welcomes) == 1 })
		w := p.stats(t).Welcomes[0]
		if w.Slot != p.slot || !strings.HasPrefix(w.Remote, src.String()+":") || w.Origin != "new" {
			t.Fatalf("%s from %s joined on %+v, want slot %d seeing the page's own address", p.nick, src, w, p.slot)
		}
	}
	var proto2 string
	if err := pages[0].b.Eval(`fetch("/whoami").then((r) => r.json()).then((w) => w.proto)`, &proto2); err != nil {
		t.Fatal(err)
	}

	n := 0
	typeRound := func() {
		n++
		for _, p := range pages {
			p.say(t, fmt.Sprintf("%s says %d", p.nick, n))
		}
	}
	for range 10 {
		typeRound()
	}

	// A deploy, typing all along: every slot moves to the new build.
	_, deployAt := cl.Deploy()
	var st *proto.Status
	for rounds := 0; ; rounds++ {
		typeRound()
		time.Sleep(100 * time.Millisecond)
		if rounds%5 != 0 {
			continue
		}
		if s, err := cl.Status(); err == nil && s.MasterPID != st0.MasterPID && s.Ready && s.DeployPhase == proto.PhaseCommitted {
			st = s
			break
		}
		if rounds > 400 {
			t.Fatal("the deploy did not commit within 400 rounds of typing")
		}
	}
	if st.Build == st0.Build {
		t.Fatalf("the deploy kept build %s: nothing rolled", st.Build)
	}
	waitPages(t, "both pages on the new build", pages, func(_ *page, s pageStats) bool {
		return len(s.Welcomes) >= 2 && s.Welcomes[len(s.Welcomes)-1].Version == st.Build
	})

	// A retirement of ann's worker, typing all along.
	retireAt := time.Now()
	retired := cl.Retire(pages[0].slot)
	for rounds := 0; len(pages[0].stats(t).Welcomes) < 3; rounds++ {
		typeRound()
		time.Sleep(100 * time.Millisecond)
		if rounds > 300 {
			t.Fatalf("ann did not reconnect after her worker %d was retired", retired)
		}
	}
	for range 5 {
		typeRound()
	}

	// Everything said has reached both pages.
	total := 0
	for _, p := range pages {
		total += p.sent
	}
	waitPages(t, "every message on every page", pages, func(_ *page, s pageStats) bool {
		return s.Outbox == 0 && len(s.IDs) >= total
	})

	sessions := map[string]*page{}
	stats := map[*page]pageStats{}
	for _, p := range pages {
		s := p.stats(t)
		stats[p] = s
		sessions[s.Session] = p
	}
	wantMoves := map[string]int{"ann": 2, "bob": 1} // the deploy moved both slots; the retirement ann's
	for _, p := range pages {
		s := stats[p]
		// Each message once, in the stream's order, and every one of both
		// senders' from m1 to their last.
		if !slices.IsSorted(s.Seqs) || len(slices.Compact(slices.Clone(s.Seqs))) != len(s.Seqs) {
			t.Errorf("%s: seqs out of order or repeated: %v", p.nick, s.Seqs)
		}
		count := map[string]int{}
		for _, id := range s.IDs {
			count[id]++
		}
		for sid, sender := range sessions {
			for i := 1; i <= sender.sent; i++ {
				if id := fmt.Sprintf("%s-m%d", sid, i); count[id] != 1 {
					t.Errorf("%s's page shows %s's message m%d %d times, want once", p.nick, sender.nick, i, count[id])
				}
			}
		}
		if len(s.IDs) != total || s.Duplicates != 0 || s.Missed != 0 || len(s.Errors) != 0 {
			t.Errorf("%s: %d messages shown of %d sent, %d duplicates dropped, %d missed, errors %q", p.nick, len(s.IDs), total, s.Duplicates, s.Missed, s.Errors)
		}
		// One reconnection per move, each to the page's own slot, a new
		// worker, with the session handed over.
		if got := len(s.Welcomes) - 1; got != wantMoves[p.nick] {
			t.Errorf("%s reconnected %d times, want %d (once per move): %+v", p.nick, got, wantMoves[p.nick], s.Welcomes)
		}
		for i, w := range s.Welcomes {
			if w.Slot != p.slot {
				t.Errorf("%s's connection %d reached slot %d, want %d", p.nick, i+1, w.Slot, p.slot)
			}
			if i > 0 {
				if w.PID == s.Welcomes[i-1].PID || w.Origin != "handoff" {
					t.Errorf("%s's reconnection %d: worker %d (before: %d), session %s, want a new worker with the session handed over", p.nick, i, w.PID, s.Welcomes[i-1].PID, w.Origin)
				}
				if c := s.Closes[i-1]; c.Code != 1012 {
					t.Errorf("%s's connection %d closed with %d %q, want 1012 (service restart)", p.nick, i, c.Code, c.Reason)
				}
			}
		}
		for i, w := range s.Welcomes {
			if w.Session != s.Session {
				t.Errorf("%s's connection %d had session %q, want %q throughout", p.nick, i+1, w.Session, s.Session)
			}
		}
	}

	// The figures.
	for _, p := range pages {
		s := stats[p]
		var gaps []string
		for i := 1; i < len(s.Welcomes); i++ {
			gaps = append(gaps, fmt.Sprintf("%d ms", s.Welcomes[i].At-s.Closes[i-1].At))
		}
		t.Logf("%s (slot %d): sent %d, acked %d, shown %d (%d live), duplicates %d, missed %d; reconnections %d, close→welcome %s",
			p.nick, p.slot, s.Sent, s.Acked, len(s.IDs), s.Received, s.Duplicates, s.Missed, len(s.Welcomes)-1, strings.Join(gaps, ", "))
	}
	ann := stats[pages[0]]
	t.Logf("page protocol %s; deploy: SIGHUP→ann's reconnection %d ms, →bob's %d ms; retirement of worker %d→ann's reconnection %d ms",
		proto2, ann.Welcomes[1].At-deployAt.UnixMilli(), stats[pages[1]].Welcomes[1].At-deployAt.UnixMilli(), retired, ann.Welcomes[2].At-retireAt.UnixMilli())

	shot := filepath.Join(dir, "chat.png")
	if err := pages[0].b.Screenshot(shot); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(shot)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := png.Decode(bytes.NewReader(data)); err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if keep := os.Getenv("IPCLUSTER_KEEP_SCREENSHOT_DIR"); keep != "" {
		_ = os.WriteFile(filepath.Join(keep, "chat-across-deploy.png"), data, 0o644)
	}
}
