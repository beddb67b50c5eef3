package main

// TLS terminated in the worker, with a certificate that is replaced on
// disk (a renewal by certbot or cert-manager) without a restart: every
// handshake asks certReloader for the certificate, which looks at the
// files at most once a second and loads them again when they changed. A
// pair that does not load (a renewal caught half-written) keeps the
// previous one in use, and is tried again at the next change.

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

const certCheckEvery = time.Second

// certReloader serves a certificate and key from files. Its fields are
// under mu.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   [2]fileStamp // of the files cert was loaded from
	checked time.Time
	failed  [2]fileStamp // the last pair that failed to load, so it is logged once
}

type fileStamp struct {
	mod  time.Time
	size int64
}

// newCertReloader loads the pair once; an error names the files.
func newCertReloader(certFile, keyFile string, log *slog.Logger) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	stamp, err := r.stamps()
	if err != nil {
		return nil, err
	}
	cert, err := loadPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	r.cert, r.stamp, r.checked = cert, stamp, time.Now()
	return r, nil
}

func loadPair(certFile, keyFile string) (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load the TLS certificate %s and key %s (PEM files; -cert and -key): %w", certFile, keyFile, err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("parse the TLS certificate %s: %w", certFile, err)
		}
	}
	return &cert, nil
}

func (r *certReloader) stamps() ([2]fileStamp, error) {
	var st [2]fileStamp
	for i, f := range []string{r.certFile, r.keyFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return st, fmt.Errorf("TLS file (-cert, -key): %w", err)
		}
		st[i] = fileStamp{mod: fi.ModTime(), size: fi.Size()}
	}
	return st, nil
}

// GetCertificate is the tls.Config hook.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.checked) >= certCheckEvery {
		r.checked = time.Now()
		r.reloadLocked()
	}
	return r.cert, nil
}

func (r *certReloader) reloadLocked() {
	stamp, err := r.stamps()
	if err != nil || stamp == r.stamp || stamp == r.failed {
		return
	}
	cert, err := loadPair(r.certFile, r.keyFile)
	if err != nil {
		r.failed = stamp
		r.log.Warn("TLS certificate changed on disk but does not load; serving the previous one", "err", err)
		return
	}
	r.cert, r.stamp = cert, stamp
	r.log.Info("TLS certificate reloaded", "file", r.certFile, "subject", cert.Leaf.Subject.String(), "not_after", cert.Leaf.NotAfter)
}

// tlsConfig is the worker's TLS: HTTP/2 and HTTP/1.1 (http.Server adds
// both protocols to a config without NextProtos), TLS 1.2 and up.
func (r *certReloader) tlsConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: r.GetCertificate}
}
