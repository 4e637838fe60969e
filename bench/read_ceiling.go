// The read figure's Go ceiling: net/http from the standard library serving the same bytes
// from a map, order_uid -> payload, read at start from a file of "uid<TAB>payload" lines
// (bench/read.py writes it from orders_events). Run with GOMAXPROCS=1 on one core.
//
//	go build -o read_ceiling bench/read_ceiling.go
//	GOMAXPROCS=1 ./read_ceiling -orders orders.tsv -addr 127.0.0.1:PORT
//
// GET /orders/{uid} answers 200 with the payload (application/json) or 404; GET /readyz 200.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
)

func load(path string) (map[string][]byte, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	orders := make(map[string][]byte)
	scanner := bufio.NewScanner(file)
	scanner.Buffer(make([]byte, 1<<20), 1<<26)
	for scanner.Scan() {
		line := scanner.Bytes()
		tab := bytes.IndexByte(line, '\t')
		if tab < 0 {
			return nil, fmt.Errorf("a line without a tab in %s", path)
		}
		orders[string(line[:tab])] = append([]byte(nil), line[tab+1:]...)
	}
	return orders, scanner.Err()
}

func main() {
	path := flag.String("orders", "", "file of uid<TAB>payload lines")
	addr := flag.String("addr", "127.0.0.1:8080", "where to listen")
	flag.Parse()
	orders, err := load(*path)
	if err != nil {
		log.Fatal(err)
	}
	jsonType := []string{"application/json"}
	notFound := []byte(`{"error":"not found"}`)
	ready := []byte(fmt.Sprintf(`{"status":"ready","orders":%d}`, len(orders)))
	mux := http.NewServeMux()
	mux.HandleFunc("/orders/", func(w http.ResponseWriter, r *http.Request) {
		uid := strings.TrimPrefix(r.URL.Path, "/orders/")
		body, found := orders[uid]
		header := w.Header()
		header["Content-Type"] = jsonType
		if !found {
			header["Content-Length"] = []string{strconv.Itoa(len(notFound))}
			w.WriteHeader(http.StatusNotFound)
			w.Write(notFound)
			return
		}
		// Explicit, so that a payload over net/http's 2 kB buffer is not sent chunked.
		header["Content-Length"] = []string{strconv.Itoa(len(body))}
		w.Write(body)
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Content-Type"] = jsonType
		w.Write(ready)
	})
	log.Fatal(http.ListenAndServe(*addr, mux))
}
