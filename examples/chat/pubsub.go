package main

// The pub/sub between workers: NATS with JetStream. Every message a
// client says is published to the stream CHAT on subject chat.room.<room>;
// every worker consumes the whole stream in order (an ordered consumer,
// which re-creates itself after a reconnection, from where it was) and
// feeds its hub. The stream gives each message its sequence number, the
// cursor every worker understands, and drops a message published twice
// with one id (a client that resends what it had not seen acknowledged
// when its socket closed), so no one sees it twice.
//
// By default the master runs the NATS server in its own process
// (startNATS), on the loopback of its network namespace, where its
// workers (its children) reach it. It lives as long as the master: a
// deploy, a restart or a retirement replaces workers, never the master.
// Where the master itself is replaced (a takeover, README.md), or for
// more than one host, run nats-server on its own and give its URL with
// -nats.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

const (
	// envNATS carries the pub/sub's URL from the master to its workers.
	envNATS = "CHAT_NATS_URL"

	streamName    = "CHAT"
	subjectPrefix = "chat.room."
)

// startNATS runs a NATS server with JetStream in this process, on a free
// port of 127.0.0.1, and returns it with its URL. Its JetStream store is
// in memory (dir holds nothing but what the server insists on).
func startNATS(dir string) (*natsserver.Server, string, error) {
	opts := &natsserver.Options{
		ServerName:         "chat-master",
		Host:               "127.0.0.1",
		Port:               natsserver.RANDOM_PORT,
		JetStream:          true,
		StoreDir:           dir,
		JetStreamMaxMemory: 256 << 20,
		JetStreamMaxStore:  1 << 20,
		NoSigs:             true, // the master's signals are ipcluster's
		NoLog:              true,
		MaxPayload:         64 << 10,
	}
	ns, err := natsserver.NewServer(opts)
	if err != nil {
		return nil, "", fmt.Errorf("configure the embedded NATS server: %w", err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, "", errors.New("the embedded NATS server did not accept connections within 10s")
	}
	return ns, ns.ClientURL(), nil
}

// bus is a worker's connection to the pub/sub.
type bus struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	log *slog.Logger
}

// dialBus connects to the pub/sub at url and makes sure the stream is
// there (the first worker creates it; the others find it).
func dialBus(ctx context.Context, url, name string, log *slog.Logger) (*bus, error) {
	nc, err := nats.Connect(url,
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond),
		nats.ReconnectJitter(250*time.Millisecond, time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("pub/sub disconnected", "err", err) }),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("pub/sub reconnected", "url", nc.ConnectedUrl()) }),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to the pub/sub at %s: %w", url, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("open JetStream on %s: %w", url, err)
	}
	_, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:       streamName,
		Subjects:   []string{subjectPrefix + "*"},
		Storage:    jetstream.MemoryStorage,
		MaxMsgs:    ringSize,
		MaxAge:     24 * time.Hour,
		Discard:    jetstream.DiscardOld,
		Duplicates: 2 * time.Minute,
	})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("create the stream %s on %s (is JetStream enabled on that server?): %w", streamName, url, err)
	}
	return &bus{nc: nc, js: js, log: log}, nil
}

// follow feeds h with the whole stream, from its first message on, until
// ctx is done, and returns once h has every message the stream had when
// it was called (or an error after wait), so that a worker that calls
// Ready after it can send any returning client what it missed.
func (b *bus) follow(ctx context.Context, h *hub, wait time.Duration) error {
	info, err := b.js.Stream(ctx, streamName)
	if err != nil {
		return fmt.Errorf("look up the stream %s: %w", streamName, err)
	}
	last := info.CachedInfo().State.LastSeq
	cons, err := b.js.OrderedConsumer(ctx, streamName, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subjectPrefix + "*"},
		DeliverPolicy:  jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return fmt.Errorf("consume the stream %s: %w", streamName, err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		md, err := msg.Metadata()
		if err != nil {
			b.log.Warn("pub/sub message without metadata", "err", err)
			return
		}
		var m message
		if err := json.Unmarshal(msg.Data(), &m); err != nil {
			b.log.Warn("undecodable message on the stream", "seq", md.Sequence.Stream, "err", err)
			return
		}
		m.Seq = md.Sequence.Stream
		h.feed(m)
	})
	if err != nil {
		return fmt.Errorf("consume the stream %s: %w", streamName, err)
	}
	context.AfterFunc(ctx, cc.Stop)
	deadline := time.After(wait)
	for !h.caughtUp(last) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("read the stream %s up to message %d: %w", streamName, last, context.Cause(ctx))
		case <-deadline:
			return fmt.Errorf("read the stream %s up to message %d: not there after %s (at %d)", streamName, last, wait, h.stats().Seq)
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// publish puts a message on the stream and returns its sequence number.
// The stream drops a second message with the same ID (within two
// minutes), returning the first one's number.
func (b *bus) publish(ctx context.Context, m message) (uint64, error) {
	data, err := json.Marshal(m)
	if err != nil {
		return 0, fmt.Errorf("encode message: %w", err)
	}
	ack, err := b.js.Publish(ctx, subjectPrefix+m.Room, data, jetstream.WithMsgID(m.ID))
	if err != nil {
		return 0, fmt.Errorf("publish to #%s: %w", m.Room, err)
	}
	return ack.Sequence, nil
}

func (b *bus) close() { b.nc.Close() }

// natsURL is the pub/sub's URL in a worker: the master's word, or -nats.
func natsURL(flagURL string) string {
	if flagURL != "" {
		return flagURL
	}
	return os.Getenv(envNATS)
}
