// A test SMSC built on node-smpp's *server* side (npm `smpp`, not written by otpgate), for the
// SMPP provider's tests and benchmark. It is driven by tests/support/smsc.py.
//
//   node smsc.mjs --port 2775 --system-id otpgate --password secret [--receipt-delay-ms 20]
//
// It listens on 127.0.0.1 only, accepts bind_transceiver (and bind_transmitter) with the
// configured system_id/password, answers every submit_sm with a fresh message_id and, after
// --receipt-delay-ms, sends a deliver_sm delivery receipt for it (the text form
// `id:… sub:001 dlvrd:001 submit date:… done date:… stat:DELIVRD err:000 text:`, plus the
// receipted_message_id and message_state TLVs), answers enquire_link and unbind.
//
// Standard output carries one JSON object per line: {"event": "ready", "port": N} once
// listening, then {"event": "pdu", ...} for every PDU received (decoded by node-smpp, with the
// raw bytes in `raw_hex`), {"event": "ack", "id": N} for every control command applied, and
// {"event": "error", ...} for socket errors. With --quiet, no PDU records: every ack carries
// `accepted`, the number of submit_sm answered ESME_ROK so far.
//
// Standard input takes one JSON control command per line (each acknowledged on stdout):
//   {"id": 1, "cmd": "throttle", "count": N}    answer the next N submit_sm with ESME_RTHROTTLED
//   {"id": 2, "cmd": "status", "count": N, "status": S}   ... with command_status S
//   {"id": 3, "cmd": "silence", "count": N}     do not answer the next N submit_sm at all
//   {"id": 4, "cmd": "drop"}                    close every open connection (no unbind)
//   {"id": 5, "cmd": "receipts", "enabled": true, "stat": "DELIVRD", "err": "000",
//    "tlvs": true, "delay_ms": 20}              how (and whether) receipts are sent
//   {"id": 6, "cmd": "refuse_binds", "enabled": true}   answer binds with ESME_RBINDFAIL
//   {"id": 7, "cmd": "ping"}                    nothing; its ack follows every earlier record
// A submit_sm record carries the answer it got: resp_status (null when left unanswered) and
// message_id.
// The process ends when standard input closes.

import readline from 'node:readline';
import smpp from 'smpp';

function argument(name, fallback) {
  const index = process.argv.indexOf(`--${name}`);
  return index >= 0 ? process.argv[index + 1] : fallback;
}

const port = Number(argument('port', '2775'));
const systemId = argument('system-id', 'otpgate');
const password = argument('password', 'secret');
// --quiet: no per-PDU records (the benchmark), only counts in every ack.
const quiet = process.argv.includes('--quiet');
let accepted = 0;

const state = {
  throttle: 0,
  statusCount: 0,
  status: 0,
  silence: 0,
  refuseBinds: false,
  receipts: {
    enabled: true,
    stat: 'DELIVRD',
    err: '000',
    tlvs: true,
    delay_ms: Number(argument('receipt-delay-ms', '20')),
  },
};
let nextMessageId = 1;

function emit(record) {
  if (quiet && record.event === 'pdu') {
    return;
  }
  process.stdout.write(JSON.stringify(record) + '\n');
}

// Keep the raw bytes of every PDU read, for the tests to check what went over the wire.
const originalFromBuffer = smpp.PDU.prototype.fromBuffer;
smpp.PDU.prototype.fromBuffer = function fromBuffer(buffer) {
  const result = originalFromBuffer.call(this, buffer);
  Object.defineProperty(this, 'raw_hex', { value: buffer.toString('hex'), enumerable: false });
  return result;
};

function describe(pdu) {
  const record = {
    event: 'pdu',
    command: pdu.command,
    command_status: pdu.command_status,
    sequence_number: pdu.sequence_number,
    raw_hex: pdu.raw_hex,
  };
  if (pdu.command.startsWith('bind_')) {
    record.system_id = pdu.system_id;
    record.system_type = pdu.system_type;
    record.interface_version = pdu.interface_version;
    record.password_ok = pdu.password === password;
  }
  if (pdu.command === 'submit_sm') {
    for (const key of [
      'service_type', 'source_addr_ton', 'source_addr_npi', 'source_addr', 'dest_addr_ton',
      'dest_addr_npi', 'destination_addr', 'esm_class', 'protocol_id', 'priority_flag',
      'registered_delivery', 'data_coding',
    ]) {
      record[key] = pdu[key];
    }
    const sm = pdu.short_message || {};
    record.text = typeof sm.message === 'string' ? sm.message : null;
    record.udh = (sm.udh || []).map((element) => element.toString('hex'));
  }
  return record;
}

function pad(number) {
  return String(number).padStart(2, '0');
}

function smppDate(date) {
  return `${pad(date.getUTCFullYear() % 100)}${pad(date.getUTCMonth() + 1)}${pad(date.getUTCDate())}` +
    `${pad(date.getUTCHours())}${pad(date.getUTCMinutes())}`;
}

const MESSAGE_STATES = { DELIVRD: 2, EXPIRED: 3, DELETED: 4, UNDELIV: 5, ACCEPTD: 6, UNKNOWN: 7, REJECTD: 8 };

function sendReceipt(session, submit, messageId, submitted) {
  const receipts = state.receipts;
  const text = `id:${messageId} sub:001 dlvrd:${receipts.stat === 'DELIVRD' ? '001' : '000'} ` +
    `submit date:${smppDate(submitted)} done date:${smppDate(new Date())} ` +
    `stat:${receipts.stat} err:${receipts.err} text:`;
  const options = {
    source_addr_ton: submit.dest_addr_ton,
    source_addr_npi: submit.dest_addr_npi,
    source_addr: submit.destination_addr,
    dest_addr_ton: submit.source_addr_ton,
    dest_addr_npi: submit.source_addr_npi,
    destination_addr: submit.source_addr,
    esm_class: smpp.ESM_CLASS.MC_DELIVERY_RECEIPT,
    data_coding: 0,
    short_message: text,
  };
  if (receipts.tlvs) {
    options.receipted_message_id = messageId;
    options.message_state = MESSAGE_STATES[receipts.stat] ?? 7;
  }
  session.deliver_sm(options);
}

const server = smpp.createServer((session) => {
  let bound = false;
  session.on('error', (error) => emit({ event: 'error', message: String(error && error.message) }));
  session.on('pdu', (pdu) => {
    if (!pdu.isResponse() && pdu.command !== 'submit_sm') {
      emit(describe(pdu));
    } else if (pdu.command === 'deliver_sm_resp') {
      emit({ event: 'pdu', command: pdu.command, command_status: pdu.command_status,
             sequence_number: pdu.sequence_number });
    }
  });
  const bind = (pdu) => {
    session.pause();
    if (state.refuseBinds) {
      session.send(pdu.response({ command_status: smpp.ESME_RBINDFAIL }));
    } else if (pdu.system_id !== systemId || pdu.password !== password) {
      session.send(pdu.response({
        command_status: pdu.system_id !== systemId ? smpp.ESME_RINVSYSID : smpp.ESME_RINVPASWD,
      }));
    } else {
      bound = true;
      session.send(pdu.response({ system_id: 'node-smsc' }));
    }
    session.resume();
  };
  session.on('bind_transceiver', bind);
  session.on('bind_transmitter', bind);
  session.on('enquire_link', (pdu) => session.send(pdu.response()));
  session.on('unbind', (pdu) => {
    session.send(pdu.response());
    session.close();
  });
  // A submit_sm is recorded with the answer it gets (resp_status null: left unanswered) before
  // that answer is written, so whoever saw the answer can find the record.
  const answer = (pdu, status, messageId) => {
    emit({ ...describe(pdu), resp_status: status, message_id: messageId ?? null });
    if (status !== null) {
      session.send(pdu.response(messageId ? { message_id: messageId } : { command_status: status }));
    }
  };
  session.on('submit_sm', (pdu) => {
    if (!bound) {
      answer(pdu, smpp.ESME_RINVBNDSTS);
      return;
    }
    if (state.silence > 0) {
      state.silence -= 1;
      answer(pdu, null);
      return;
    }
    if (state.throttle > 0) {
      state.throttle -= 1;
      answer(pdu, smpp.ESME_RTHROTTLED);
      return;
    }
    if (state.statusCount > 0) {
      state.statusCount -= 1;
      answer(pdu, state.status);
      return;
    }
    const messageId = `n${(nextMessageId++).toString(16).padStart(8, '0')}`;
    const submitted = new Date();
    accepted += 1;
    answer(pdu, 0, messageId);
    if (state.receipts.enabled && (pdu.registered_delivery & 0x03) === 1) {
      setTimeout(() => {
        if (!session.socket.destroyed) {
          sendReceipt(session, pdu, messageId, submitted);
        }
      }, state.receipts.delay_ms);
    }
  });
});

server.on('error', (error) => {
  emit({ event: 'error', message: String(error && error.message) });
  process.exit(2);
});

server.listen(port, '127.0.0.1', () => {
  emit({ event: 'ready', port: server.address().port });
});

const control = readline.createInterface({ input: process.stdin });
control.on('line', (line) => {
  if (!line.trim()) {
    return;
  }
  const command = JSON.parse(line);
  switch (command.cmd) {
    case 'throttle':
      state.throttle = command.count;
      break;
    case 'status':
      state.statusCount = command.count;
      state.status = command.status;
      break;
    case 'silence':
      state.silence = command.count;
      break;
    case 'drop':
      for (const session of [...server.sessions]) {
        session.destroy();
      }
      break;
    case 'receipts':
      state.receipts = { ...state.receipts, ...command };
      delete state.receipts.cmd;
      delete state.receipts.id;
      break;
    case 'refuse_binds':
      state.refuseBinds = command.enabled;
      break;
    case 'ping': // nothing: its ack says every record before it has been written
      break;
    default:
      emit({ event: 'error', message: `unknown command ${command.cmd}` });
  }
  emit({ event: 'ack', id: command.id, accepted });
});
control.on('close', () => {
  for (const session of [...server.sessions]) {
    session.destroy();
  }
  server.close();
  process.exit(0);
});
