//go:build linux

package ipcluster

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// The per-worker series of a status with two retired workers draining
// from one slot, a crash-looping slot and a spare: labelled by slot and
// state only, one series per label set, the pid only in
// ipcluster_worker_info; several workers in one series add up.
func TestStatusMetricsLabels(t *testing.T) {
	stats := func(conns int64, lag float64) *proto.Stats {
		return &proto.Stats{Connections: conns, LagSec: lag, HeapBytes: 1 << 20, Goroutines: 5, Accepted: 10}
	}
	st := &proto.Status{Generation: 2, Build: "v2", DeployPhase: string(DeployStarted),
		Slots: []proto.SlotStatus{{Slot: 0, Active: 100}, {Slot: 1, Active: 0}},
		Workers: []proto.WorkerStatus{
			{PID: 100, Slot: 0, Generation: 2, State: "active", Build: "v2", StartTime: 1000, RSSBytes: 7 << 20, Stats: stats(3, 0.001)},
			{PID: 90, Slot: 0, Generation: 1, State: "retired", Build: "v1", StartTime: 500, RSSBytes: 8 << 20, Stats: stats(2, 0.004)},
			{PID: 91, Slot: 0, Generation: 1, State: "retired", Build: "v1", StartTime: 600, RSSBytes: 9 << 20, Stats: stats(1, 0.002)},
			{PID: 120, Slot: 1, Generation: 2, State: "starting", Build: "v2", StartTime: 1100},
			{PID: 130, Slot: -1, Generation: 2, State: "spare", Build: "v2", StartTime: 1050, RSSBytes: 6 << 20, Stats: stats(0, 0)},
		}}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(statusCollector{st})
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	infos := 0
	for _, f := range families {
		name := f.GetName()
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				if l.GetName() == "pid" && name != "ipcluster_worker_info" {
					t.Errorf("%s has a pid label", name)
				}
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
			got[name+"{"+strings.Join(labels, ",")+"}"] = v
			if name == "ipcluster_worker_info" {
				infos++
			}
		}
	}
	if infos != len(st.Workers) {
		t.Errorf("%d ipcluster_worker_info series, want one per worker (%d)", infos, len(st.Workers))
	}
	for series, want := range map[string]float64{
		"ipcluster_worker_info{build=v1,generation=1,pid=90,slot=0,state=retired}":    1,
		"ipcluster_worker_info{build=v2,generation=2,pid=130,slot=spare,state=spare}": 1,
		"ipcluster_worker_connections{slot=0,state=active}":                           3,
		"ipcluster_worker_connections{slot=0,state=retired}":                          3,
		"ipcluster_worker_rss_bytes{slot=0,state=retired}":                            17 << 20,
		"ipcluster_worker_lag_seconds{slot=0,state=retired}":                          0.004,
		"ipcluster_worker_start_time_seconds{slot=0,state=retired}":                   500,
		"ipcluster_worker_start_time_seconds{slot=1,state=starting}":                  1100,
		"ipcluster_worker_start_time_seconds{slot=spare,state=spare}":                 1050,
		"ipcluster_worker_accepted_connections_total{slot=0,state=retired}":           20,
		"ipcluster_slot_connections{slot=0}":                                          6,
		"ipcluster_deploy_in_progress{}":                                              1,
	} {
		if v, ok := got[series]; !ok || v != want {
			t.Errorf("%s = %g (present %v), want %g", series, v, ok, want)
		}
	}
	for _, series := range []string{"ipcluster_worker_lag_seconds{slot=1,state=starting}", "ipcluster_worker_uptime_seconds{slot=0,state=active}"} {
		if _, ok := got[series]; ok {
			t.Errorf("%s present", series)
		}
	}
}
