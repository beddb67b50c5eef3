//go:build !unix

package main

// Where there is no fork-and-setsid (Windows, Plan 9: development mode
// only), the master runs NATS in its own process.

import (
	"fmt"
	"log/slog"
	"os"
)

const envSidecar = "CHAT_NATS_SIDECAR"

type sidecarState struct {
	PID int
	URL string
	dir string
	ns  interface{ Shutdown() }
}

func pubsubDir(runDir, name string) string { return "" }

func ensureSidecar(string, *slog.Logger) (sidecarState, error) {
	dir, err := os.MkdirTemp("", "chat-nats-")
	if err != nil {
		return sidecarState{}, fmt.Errorf("make the NATS server's directory: %w", err)
	}
	ns, url, err := startNATS(dir)
	if err != nil {
		return sidecarState{}, err
	}
	return sidecarState{PID: os.Getpid(), URL: url, dir: dir, ns: ns}, nil
}

func stopSidecar(st sidecarState, _ *slog.Logger) {
	st.ns.Shutdown()
	_ = os.RemoveAll(st.dir)
}

func runSidecar(string) int { return 1 }
