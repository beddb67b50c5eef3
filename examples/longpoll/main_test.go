package main

// Tests of the chat alone: no cluster, no root, no namespace (the library's
// own tests cover routing and retirement).

import (
	"bufio"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// newTestServer starts the chat of a pretend worker with pid.
func newTestServer(t *testing.T, pid int) (*server, *httptest.Server) {
	t.Helper()
	s := newServer(workerInfo{Slot: 1, PID: pid, Generation: 1, Version: "test"}, slog.New(slog.DiscardHandler), time.Second)
	s.pollWait = 300 * time.Millisecond
	ts := httptest.NewServer(s.handler())
	t.Cleanup(ts.Close)
	t.Cleanup(s.stop) // before ts.Close: end open streams
	return s, ts
}

func newClient(t *testing.T) *http.Client {
	t.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Jar: jar, Timeout: 5 * time.Second}
}

// do sends a request and decodes a 200 answer's JSON into v (if not nil);
// it returns the status code.
func do(t *testing.T, c *http.Client, method, u string, v any) int {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK && v != nil {
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("%s %s: decode: %v", method, u, err)
		}
	}
	return resp.StatusCode
}

func join(t *testing.T, c *http.Client, base, nick, room string) whoamiReply {
	t.Helper()
	var who whoamiReply
	if code := do(t, c, "POST", base+"/join?"+url.Values{"nick": {nick}, "room": {room}}.Encode(), &who); code != 200 {
		t.Fatalf("join %s to %s: status %d", nick, room, code)
	}
	return who
}

func send(t *testing.T, c *http.Client, base, room, text string) message {
	t.Helper()
	var m message
	if code := do(t, c, "POST", base+"/send?"+url.Values{"room": {room}, "text": {text}}.Encode(), &m); code != 200 {
		t.Fatalf("send %q to %s: status %d", text, room, code)
	}
	return m
}

func poll(t *testing.T, c *http.Client, u string) pollReply {
	t.Helper()
	var p pollReply
	if code := do(t, c, "GET", u, &p); code != 200 {
		t.Fatalf("GET %s: status %d", u, code)
	}
	return p
}

func TestSessions(t *testing.T) {
	_, ts := newTestServer(t, 100)
	ann := newClient(t)

	var who whoamiReply
	do(t, ann, "GET", ts.URL+"/whoami", &who)
	if who.Session != nil || who.PID != 100 || who.Slot != 1 || who.Version != "test" {
		t.Fatalf("whoami before join = %+v, want worker 100 in slot 1, no session", who)
	}
	for _, path := range []string{"/send?text=x", "/poll", "/events"} {
		method := "GET"
		if strings.HasPrefix(path, "/send") {
			method = "POST"
		}
		if code := do(t, ann, method, ts.URL+path, nil); code != http.StatusUnauthorized {
			t.Errorf("%s %s without a session: status %d, want 401", method, path, code)
		}
	}
	if code := do(t, ann, "POST", ts.URL+"/join?room=lobby", nil); code != http.StatusBadRequest {
		t.Errorf("first join without a nick: status %d, want 400", code)
	}
	if code := do(t, ann, "POST", ts.URL+"/join?nick=ann&room=No+Spaces", nil); code != http.StatusBadRequest {
		t.Errorf("join with a bad room name: status %d, want 400", code)
	}

	join(t, ann, ts.URL, "ann", "lobby")
	who = join(t, ann, ts.URL, "", "dev") // a second room, same session and nick
	if s := who.Session; s == nil || s.Nick != "ann" || strings.Join(s.Rooms, ",") != "dev,lobby" || s.Rejoined {
		t.Fatalf("session after two joins = %+v, want ann in dev and lobby", who.Session)
	}
	if code := do(t, ann, "POST", ts.URL+"/send?room=ops&text=x", nil); code != http.StatusBadRequest {
		t.Errorf("send to a room not joined: status %d, want 400", code)
	}
}

// A client whose slot moved to another worker (a deploy) brings cookies
// that worker has never seen: it re-joins from the chat cookie.
func TestRejoinOnAnotherWorker(t *testing.T) {
	_, old := newTestServer(t, 100)
	_, next := newTestServer(t, 200)
	ann, bob := newClient(t), newClient(t)
	join(t, ann, old.URL, "ann", "lobby")
	join(t, ann, old.URL, "", "dev")
	sid := cookie(t, ann, old.URL, sidCookie)

	// The cookie jar is per host; both test servers are 127.0.0.1.
	var who whoamiReply
	do(t, ann, "GET", next.URL+"/whoami", &who)
	if s := who.Session; who.PID != 200 || s == nil || s.Nick != "ann" || strings.Join(s.Rooms, ",") != "dev,lobby" || !s.Rejoined {
		t.Fatalf("whoami on the new worker = %+v %+v, want ann re-joined to dev and lobby", who, who.Session)
	}
	if got := cookie(t, ann, next.URL, sidCookie); got != sid {
		t.Errorf("session id changed on re-join: %s, was %s", got, sid)
	}

	// Messages the new worker had before she arrived are all news to her.
	join(t, bob, next.URL, "bob", "lobby")
	m := send(t, bob, next.URL, "lobby", "welcome")
	p := poll(t, ann, next.URL+"/poll")
	if len(p.Messages) != 1 || p.Messages[0].Seq != m.Seq {
		t.Fatalf("ann's first poll on the new worker = %+v, want bob's message %d", p.Messages, m.Seq)
	}

	// No chat cookie, unknown id: no session.
	stranger := newClient(t)
	u, _ := url.Parse(next.URL)
	stranger.Jar.SetCookies(u, []*http.Cookie{{Name: sidCookie, Value: strings.Repeat("ab", 16)}})
	if code := do(t, stranger, "GET", next.URL+"/poll", nil); code != http.StatusUnauthorized {
		t.Errorf("poll with an unknown session and no chat cookie: status %d, want 401", code)
	}
}

func cookie(t *testing.T, c *http.Client, base, name string) string {
	t.Helper()
	u, _ := url.Parse(base)
	for _, ck := range c.Jar.Cookies(u) {
		if ck.Name == name {
			return ck.Value
		}
	}
	t.Fatalf("no %s cookie", name)
	return ""
}

func TestRoomsAndCursor(t *testing.T) {
	_, ts := newTestServer(t, 100)
	ann, bob, cat := newClient(t), newClient(t), newClient(t)
	join(t, ann, ts.URL, "ann", "lobby")
	join(t, bob, ts.URL, "bob", "lobby")
	join(t, cat, ts.URL, "cat", "dev")

	m1 := send(t, bob, ts.URL, "", "one") // the first room joined
	send(t, cat, ts.URL, "dev", "not for ann")
	m2 := send(t, bob, ts.URL, "lobby", "two")
	if m1.Room != "lobby" || m1.From != "bob" || m2.Seq <= m1.Seq {
		t.Fatalf("messages %+v %+v: want lobby from bob, increasing seq", m1, m2)
	}

	var who whoamiReply
	do(t, ann, "GET", ts.URL+"/whoami", &who)
	if who.Session.Unread != 2 {
		t.Errorf("ann's unread = %d, want 2 (dev is not her room)", who.Session.Unread)
	}
	p := poll(t, ann, ts.URL+"/poll")
	if len(p.Messages) != 2 || p.Messages[0].Text != "one" || p.Messages[1].Text != "two" || p.Reset {
		t.Fatalf("ann's poll = %+v, want one and two", p)
	}
	do(t, ann, "GET", ts.URL+"/whoami", &who)
	if who.Session.Unread != 0 || who.Session.Cursor != p.Cursor {
		t.Errorf("after the poll ann's session = %+v, want unread 0 and cursor %d", who.Session, p.Cursor)
	}

	// An explicit cursor replays from there.
	p = poll(t, ann, ts.URL+"/poll?cursor="+itoa(m1.Seq))
	if len(p.Messages) != 1 || p.Messages[0].Seq != m2.Seq {
		t.Errorf("poll after %d = %+v, want only %d", m1.Seq, p.Messages, m2.Seq)
	}
	// A cursor from another worker (here: beyond this one's last
	// message) means everything this worker has, flagged.
	p = poll(t, ann, ts.URL+"/poll?cursor="+itoa(m2.Seq+1000))
	if !p.Reset || len(p.Messages) != 2 {
		t.Errorf("poll with a foreign cursor = %+v, want reset and both messages", p)
	}
	if code := do(t, ann, "GET", ts.URL+"/poll?cursor=abc", nil); code != http.StatusBadRequest {
		t.Errorf("poll with cursor=abc: status %d, want 400", code)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

func TestLongPoll(t *testing.T) {
	s, ts := newTestServer(t, 100)
	ann, bob := newClient(t), newClient(t)
	join(t, ann, ts.URL, "ann", "lobby")
	join(t, bob, ts.URL, "bob", "lobby")

	// Nothing new: the poll waits pollWait and answers empty, with a
	// cursor to go on from.
	start := time.Now()
	p := poll(t, ann, ts.URL+"/poll")
	if len(p.Messages) != 0 || time.Since(start) < s.pollWait || p.Cursor == 0 {
		t.Fatalf("idle poll = %+v after %s, want empty after %s", p, time.Since(start), s.pollWait)
	}

	// A message sent while the poll waits ends it at once.
	s.pollWait = 5 * time.Second
	got := make(chan pollReply, 1)
	go func() { got <- poll(t, ann, ts.URL+"/poll?cursor="+itoa(p.Cursor)) }()
	waitFor(t, func() bool { return s.polls.Load() == 1 })
	if st := s.stats(); st.Polls != 1 || st.Sessions != 2 {
		t.Errorf("stats during the poll = %+v, want 1 poll, 2 sessions", st)
	}
	m := send(t, bob, ts.URL, "lobby", "now")
	select {
	case p := <-got:
		if len(p.Messages) != 1 || p.Messages[0].Seq != m.Seq || p.Cursor != m.Seq {
			t.Fatalf("woken poll = %+v, want message %d", p, m.Seq)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("poll not woken by a message")
	}

	// Stop ends a poll at once.
	s.pollWait = time.Minute
	go func() { got <- poll(t, ann, ts.URL+"/poll") }()
	waitFor(t, func() bool { return s.polls.Load() == 1 })
	s.stop()
	select {
	case p := <-got:
		if len(p.Messages) != 0 {
			t.Errorf("poll ended by stop = %+v, want empty", p)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("poll not ended by stop")
	}

	// Retirement ends a poll within pollRetireSpread, not pollWait: the
	// client's next poll reaches the new worker.
	s, ts = newTestServer(t, 101)
	s.pollWait = time.Minute
	join(t, ann, ts.URL, "ann", "lobby")
	go func() { got <- poll(t, ann, ts.URL+"/poll") }()
	waitFor(t, func() bool { return s.polls.Load() == 1 })
	s.drain()
	select {
	case p := <-got:
		if len(p.Messages) != 0 {
			t.Errorf("poll ended by retirement = %+v, want empty", p)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("poll not ended by retirement")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 2s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWriteEvent(t *testing.T) {
	for _, tc := range []struct {
		id    uint64
		event string
		data  string
		want  string
	}{
		{7, "message", `{"a":1}`, "id: 7\nevent: message\ndata: {\"a\":1}\n\n"},
		{0, "hello", "x", "event: hello\ndata: x\n\n"},
		{0, "", "two\nlines", "data: two\ndata: lines\n\n"},
		{0, "", "crlf\r\nline", "data: crlf\ndata: line\n\n"},
	} {
		var b strings.Builder
		if err := writeEvent(&b, tc.id, tc.event, []byte(tc.data)); err != nil {
			t.Fatal(err)
		}
		if b.String() != tc.want {
			t.Errorf("writeEvent(%d, %q, %q) = %q, want %q", tc.id, tc.event, tc.data, b.String(), tc.want)
		}
	}
}

// sseEvent is one parsed server-sent event.
type sseEvent struct{ id, event, data, retry string }

// readEvent reads the next event, skipping comments; retry is kept from a
// retry-only block before it.
func readEvent(t *testing.T, r *bufio.Reader) sseEvent {
	t.Helper()
	var ev sseEvent
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read event: %v (so far %+v)", err, ev)
		}
		line = strings.TrimSuffix(line, "\n")
		k, v, _ := strings.Cut(line, ": ")
		switch {
		case line == "":
			if ev.event != "" || ev.data != "" {
				return ev
			}
		case strings.HasPrefix(line, ":"):
		case k == "id":
			ev.id = v
		case k == "event":
			ev.event = v
		case k == "data":
			ev.data += v
		case k == "retry":
			ev.retry = v
		}
	}
}

func TestEvents(t *testing.T) {
	s, ts := newTestServer(t, 100)
	s.tickEvery = 50 * time.Millisecond
	ann, bob := newClient(t), newClient(t)
	join(t, ann, ts.URL, "ann", "lobby")
	join(t, bob, ts.URL, "bob", "lobby")
	early := send(t, bob, ts.URL, "lobby", "before the stream")

	resp, err := ann.Get(ts.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	r := bufio.NewReader(resp.Body)
	if ev := readEvent(t, r); ev.event != "hello" || ev.retry != "3000" || !strings.Contains(ev.data, `"pid":100`) {
		t.Fatalf("first event %+v, want hello from pid 100 with retry 3000", ev)
	}
	// The unread backlog first, then live messages, each with its id.
	if ev := readEvent(t, r); ev.event != "message" || ev.id != itoa(early.Seq) {
		t.Fatalf("backlog event %+v, want message %d", ev, early.Seq)
	}
	live := send(t, bob, ts.URL, "lobby", "live")
	if ev := readEvent(t, r); ev.event != "message" || ev.id != itoa(live.Seq) || !strings.Contains(ev.data, `"live"`) {
		t.Fatalf("live event %+v, want message %d", ev, live.Seq)
	}
	if st := s.stats(); st.Streams != 1 || st.Messages != 2 {
		t.Errorf("stats = %+v, want 1 stream, 2 messages", st)
	}

	// Retired: announced at once with a short retry, still flowing, then
	// closed within the grace period.
	start := time.Now()
	s.drain()
	ev := readEvent(t, r)
	if ev.event != "retiring" || ev.retry == "" || !strings.Contains(ev.data, `"closing_in_ms"`) {
		t.Fatalf("event after drain %+v, want retiring with a retry hint", ev)
	}
	after := send(t, bob, ts.URL, "lobby", "still here")
	if ev := readEvent(t, r); ev.id != itoa(after.Seq) {
		t.Fatalf("event during the grace period %+v, want message %d", ev, after.Seq)
	}
	if ev := readEvent(t, r); ev.event != "bye" || !strings.Contains(ev.data, "retired") {
		t.Fatalf("last event %+v, want bye", ev)
	}
	if _, err := r.ReadString('\n'); err != io.EOF {
		t.Errorf("stream not closed after bye: %v", err)
	}
	if d := time.Since(start); d < s.sseGrace/2 || d > s.sseGrace+time.Second {
		t.Errorf("stream closed %s after retirement, want within %s..%s", d, s.sseGrace/2, s.sseGrace)
	}

	// Reconnecting with Last-Event-ID resumes after it.
	req, _ := http.NewRequest("GET", ts.URL+"/events", nil)
	req.Header.Set("Last-Event-ID", itoa(live.Seq))
	resp2, err := ann.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	r2 := bufio.NewReader(resp2.Body)
	readEvent(t, r2) // hello
	if ev := readEvent(t, r2); ev.id != itoa(after.Seq) {
		t.Fatalf("first message after Last-Event-ID %d: %+v, want %d", live.Seq, ev, after.Seq)
	}
	// Told to finish: a last retry hint and bye, at once. (This stream
	// opened after retirement, so it may say "retiring" first.)
	s.stop()
	ev = readEvent(t, r2)
	if ev.event == "retiring" {
		ev = readEvent(t, r2)
	}
	if ev.event != "bye" || !strings.Contains(ev.data, "stopping") || ev.retry == "" {
		t.Fatalf("event after stop %+v, want bye with a retry hint", ev)
	}
}

func TestIndex(t *testing.T) {
	_, ts := newTestServer(t, 100)
	resp, err := http.Get(ts.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "EventSource") || strings.Contains(string(body), "src=\"http") {
		t.Errorf("GET / = %s, %d bytes: want the self-contained client", resp.Status, len(body))
	}
	if resp, err := http.Get(ts.URL + "/nope"); err != nil || resp.StatusCode != 404 {
		t.Errorf("GET /nope = %v %v, want 404", resp, err)
	}
}

func TestExpire(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	h := newHub(func() time.Time { return now })
	idle, _ := h.join(nil, strings.Repeat("01", 16), "idle", "lobby", netip.Addr{})
	busy, _ := h.join(nil, strings.Repeat("02", 16), "busy", "lobby", netip.Addr{})
	h.opened(busy, 1)
	now = now.Add(sessionTTL + time.Second)
	if n := h.expire(sessionTTL); n != 1 {
		t.Fatalf("expired %d sessions, want 1 (the idle one)", n)
	}
	if h.sessions[idle.id] != nil || h.sessions[busy.id] == nil {
		t.Error("expired the wrong session")
	}
}

// The example also builds where the sandbox does not exist.
func TestBuildOtherOS(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the example for darwin")
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool on PATH: %v", err)
	}
	cmd := exec.Command(gobin, "build", "-o", os.DevNull, ".")
	cmd.Env = append(os.Environ(), "GOOS=darwin", "GOARCH=arm64", "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("GOOS=darwin go build: %v\n%s", err, out)
	}
}
