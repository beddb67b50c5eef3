package proto

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// ErrRefused is returned by Dial when the master refuses the hello.
var ErrRefused = errors.New("proto: refused by master")

// Client is a control client connection (role "client").
type Client struct {
	conn net.Conn
	r    *Reader
}

// Dial connects to a master's control socket and completes the hello.
func Dial(ctx context.Context, socket, cluster string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to master at %s: %w", socket, err)
	}
	c := &Client{conn: conn, r: NewReader(conn)}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	hello := Hello{Version: Version, Role: RoleClient, Cluster: cluster, PID: os.Getpid()}
	if err := Write(conn, TypeHello, &hello); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send hello to %s: %w", socket, err)
	}
	m, err := c.r.Read()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read welcome from %s: %w", socket, err)
	}
	switch b := m.Body.(type) {
	case *Welcome:
		return c, nil
	case *Refuse:
		conn.Close()
		return nil, fmt.Errorf("%w: %s", ErrRefused, b.Reason)
	}
	conn.Close()
	return nil, fmt.Errorf("master at %s answered hello with %q", socket, m.Type)
}

// Status asks the master for its status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(10 * time.Second)
	}
	_ = c.conn.SetDeadline(dl)
	if err := Write(c.conn, TypeStatus, nil); err != nil {
		return nil, fmt.Errorf("send status request: %w", err)
	}
	m, err := c.r.Read()
	if err != nil {
		return nil, fmt.Errorf("read status: %w", err)
	}
	switch b := m.Body.(type) {
	case *Status:
		return b, nil
	case *Refuse:
		return nil, fmt.Errorf("status refused: %s", b.Reason)
	}
	return nil, fmt.Errorf("master answered status with %q", m.Type)
}

// Restart asks the master to roll every worker, as SIGUSR2 does.
func (c *Client) Restart(ctx context.Context) error {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(10 * time.Second)
	}
	_ = c.conn.SetDeadline(dl)
	if err := Write(c.conn, TypeRestart, nil); err != nil {
		return fmt.Errorf("send restart request: %w", err)
	}
	m, err := c.r.Read()
	if err != nil {
		return fmt.Errorf("read restart answer: %w", err)
	}
	switch b := m.Body.(type) {
	case *Refuse:
		return fmt.Errorf("restart refused: %s", b.Reason)
	}
	return nil
}

// Resize asks the master to change the number of slots to workers. It
// returns once the resize has started; the status shows when it is done.
func (c *Client) Resize(ctx context.Context, workers int) error {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(10 * time.Second)
	}
	_ = c.conn.SetDeadline(dl)
	if err := Write(c.conn, TypeResize, &Resize{Workers: workers}); err != nil {
		return fmt.Errorf("send resize request: %w", err)
	}
	m, err := c.r.Read()
	if err != nil {
		return fmt.Errorf("read resize answer: %w", err)
	}
	if b, ok := m.Body.(*Refuse); ok {
		return fmt.Errorf("%w: %s", ErrRefused, b.Reason)
	}
	return nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
