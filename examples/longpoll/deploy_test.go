//go:build linux

package main

// The example as a cluster, in a netlab lab (needs root): its binary is
// built, started as the master in the lab's server namespace, then
// rebuilt and deployed (SIGHUP) under load.

import (
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/examplelab"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// Every session made before a deploy is found afterwards, on the new
// workers, with its nickname and cursor, not re-joined from its cookie:
// the old workers handed their hubs over. Meanwhile a bounded load of new
// clients joins and talks, and none of its requests fails.
func TestSessionsSurviveDeploy(t *testing.T) {
	const sessions, loaders = 24, 8
	lab := netlab.NewT(t, netlab.Options{Clients: sessions + loaders})
	cl := examplelab.Start(t, lab, t.TempDir(), "lp", "-workers", "2", "-port", "8080", "-addr", lab.ServerAddr4.String())
	cl.BuildNext("-X main.deployTestBuild=2")
	st0 := cl.Wait("the cluster ready", func(st *proto.Status) bool { return st.Ready })
	base := "http://" + netip.AddrPortFrom(lab.ServerAddr4, 8080).String()

	// The sessions: each joins, talks, and polls once, so that its cursor
	// is its own.
	type kept struct {
		c   *http.Client
		who whoamiReply
	}
	var before []kept
	for i, src := range lab.ClientAddrs4[:sessions] {
		c := client(lab, src)
		nick := fmt.Sprintf("user%d", i)
		room := []string{"lobby", "dev", "ops"}[i%3]
		var who whoamiReply
		var m message
		var p pollReply
		for _, step := range []error{
			call(c, http.MethodPost, base+"/join?"+url.Values{"nick": {nick}, "room": {room}}.Encode(), &who),
			call(c, http.MethodPost, base+"/send?"+url.Values{"text": {"hello from " + nick}}.Encode(), &m),
			call(c, http.MethodGet, base+"/poll?cursor=0", &p),
			call(c, http.MethodGet, base+"/whoami", &who),
		} {
			if step != nil {
				t.Fatalf("%s from %s: %v", nick, src, step)
			}
		}
		if who.Session == nil || who.Session.Cursor != p.Cursor {
			t.Fatalf("%s: %+v after a poll answering cursor %d", nick, who.Session, p.Cursor)
		}
		before = append(before, kept{c, who})
	}

	// The load: new clients join and talk, until the deploy is checked:
	// at most 600 each, about 40 a second, for some 15s, across the whole
	// deploy (its canary period is 5s).
	var requests, failures atomic.Int64
	var errMu sync.Mutex
	var firstErr error
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, src := range lab.ClientAddrs4[sessions:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 600; n++ {
				select {
				case <-stop:
					return
				default:
				}
				c := client(lab, src) // a new client: a new session
				nick := fmt.Sprintf("load%d_%d", i, n)
				var who whoamiReply
				var m message
				for _, err := range []error{
					call(c, http.MethodPost, base+"/join?"+url.Values{"nick": {nick}, "room": {"lobby"}}.Encode(), &who),
					call(c, http.MethodPost, base+"/send?"+url.Values{"text": {"load"}}.Encode(), &m),
				} {
					requests.Add(1)
					if err != nil {
						failures.Add(1)
						errMu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						errMu.Unlock()
					}
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()

	// The new build over the binary, then SIGHUP: the deploy.
	cl.Deploy()
	st := cl.Wait("the deploy committed", func(st *proto.Status) bool {
		return st.MasterPID != st0.MasterPID && st.Ready && st.DeployPhase == proto.PhaseCommitted
	})
	if st.Build == st0.Build {
		t.Fatalf("the deploy kept build %s: nothing rolled", st.Build)
	}

	for _, k := range before {
		var who whoamiReply
		if err := call(k.c, http.MethodGet, base+"/whoami", &who); err != nil {
			t.Fatalf("%s after the deploy: %v", k.who.Session.Nick, err)
		}
		want := k.who.Session
		switch s := who.Session; {
		case who.PID == k.who.PID || who.Version == k.who.Version:
			t.Errorf("%s: whoami after the deploy answered by worker %d (%s), the one before it", want.Nick, who.PID, who.Version)
		case s == nil || s.Nick != want.Nick || s.Cursor != want.Cursor || strings.Join(s.Rooms, ",") != strings.Join(want.Rooms, ",") || s.Rejoined:
			t.Errorf("%s on worker %d after the deploy: %+v, want %+v, not re-joined", want.Nick, who.PID, s, want)
		}
	}
	close(stop)
	wg.Wait()
	stop = make(chan struct{})
	t.Logf("%d sessions kept across the deploy; load: %d requests, %d failed (%v)", len(before), requests.Load(), failures.Load(), firstErr)
	if failures.Load() != 0 || requests.Load() == 0 {
		t.Errorf("load during the deploy: %d of %d requests failed: %v", failures.Load(), requests.Load(), firstErr)
	}
	if b, err := os.ReadFile(cl.LogFile); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "msg=\"state handed over\"") || strings.Contains(line, "msg=\"sessions taken") {
				t.Log(line)
			}
		}
	}
}
