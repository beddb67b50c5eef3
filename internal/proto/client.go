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

// Do sends a request and returns the master's answer. An error answer
// is returned as an error wrapping ErrRefused, with the master's reason.
func (c *Client) Do(ctx context.Context, typ string, body any) (Msg, error) {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(10 * time.Second)
	}
	_ = c.conn.SetDeadline(dl)
	if err := Write(c.conn, typ, body); err != nil {
		return Msg{}, fmt.Errorf("send %s request: %w", typ, err)
	}
	m, err := c.r.Read()
	if err != nil {
		return Msg{}, fmt.Errorf("read %s answer: %w", typ, err)
	}
	if b, ok := m.Body.(*Refuse); ok {
		return m, fmt.Errorf("%w: %s", ErrRefused, b.Reason)
	}
	return m, nil
}

// Restart asks the master to roll every worker, as SIGUSR2 does.
func (c *Client) Restart(ctx context.Context) error {
	_, err := c.Do(ctx, TypeRestart, nil)
	return err
}

// Resize asks the master to change the number of slots to workers. It
// returns once the resize has started; the status shows when it is done.
func (c *Client) Resize(ctx context.Context, workers int) error {
	_, err := c.Do(ctx, TypeResize, &Resize{Workers: workers})
	return err
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
