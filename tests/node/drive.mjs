// Drives LabsMobile's own Node client (npm `labsmobile-sms`, pinned in package-lock.json)
// against a LabsMobile-compatible server: otpgate, or the loopback LabsMobile stub of the tests.
//
// Environment:
//   LABSMOBILE_URL       base URL, e.g. http://127.0.0.1:8000 (the client's `_urlBase`)
//   LABSMOBILE_USERNAME  HTTP Basic username (the account's username)
//   LABSMOBILE_TOKEN     HTTP Basic password (for otpgate: an API key)
//   LABSMOBILE_NUMBERS   optional, two msisdns separated by a comma (default 34600000001,34600000002)
//
// It makes four calls, in order, and prints one JSON line per call on standard output:
//   {"call": "send" | "balance" | "prices" | "send_test", "ok": true, "answer": <what the client returned>}
//   {"call": ..., "ok": false, "error": {"kind": ..., "status": ..., "message": ...}}
// `send` sends one SMS to both numbers, `balance` reads the credits, `prices` reads the prices
// of ES and FR, `send_test` sends one SMS to the first number in test mode. The exit status is
// 0 when every call succeeded and 1 otherwise.
//
// The client creates a log file, LabsMobile.log, in the working directory, and prints the
// stack of any transport error with console.log. So this script runs it in a temporary
// directory that it removes at the end, and sends console.log to standard error, leaving
// standard output to the JSON lines.

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import LabsMobileClient from 'labsmobile-sms/src/LabsMobileClient.js'
import LabsMobileModelTextMessage from 'labsmobile-sms/src/LabsMobileModelTextMessage.js'
import LabsMobileModelCountryPrice from 'labsmobile-sms/src/LabsMobileModelCountryPrice.js'
import LabsMobileException from 'labsmobile-sms/src/Exception/LabsMobileException.js'

function required (name) {
  const value = process.env[name]
  if (!value) {
    console.error(`drive.mjs: ${name} is required`)
    process.exit(2)
  }
  return value
}

const baseUrl = required('LABSMOBILE_URL').replace(/\/+$/, '')
const username = required('LABSMOBILE_USERNAME')
const token = required('LABSMOBILE_TOKEN')
const numbers = (process.env.LABSMOBILE_NUMBERS || '34600000001,34600000002').split(',')
if (numbers.length !== 2 || numbers.some(n => !/^\d+$/.test(n))) {
  console.error('drive.mjs: LABSMOBILE_NUMBERS must be two msisdns (digits) separated by a comma')
  process.exit(2)
}

const stdout = process.stdout
console.log = (...args) => console.error(...args)

const workDir = mkdtempSync(join(tmpdir(), 'labsmobile-client-'))
process.chdir(workDir)
let failures = 0

try {
  const client = new LabsMobileClient(username, token)
  client._urlBase = baseUrl
  if (client._urlBase !== baseUrl) {
    // A client that ignored the field would send to LabsMobile itself.
    throw new Error('drive.mjs: the client did not take the base URL (its _urlBase field)')
  }

  const calls = [
    ['send', () => client.sendSms(
      new LabsMobileModelTextMessage(numbers, 'Hello from the LabsMobile Node client'))],
    ['balance', () => client.getCredit()],
    ['prices', () => client.getpricesCountry(new LabsMobileModelCountryPrice(['ES', 'FR']))],
    ['send_test', () => {
      const message = new LabsMobileModelTextMessage([numbers[0]], 'Test mode from the Node client')
      message.test = '1'
      return client.sendSms(message)
    }]
  ]

  for (const [name, call] of calls) {
    let line
    try {
      const answer = await call()
      if (answer === undefined) {
        // The client swallows transport errors and non-2xx answers (it only logs them).
        line = {
          call: name,
          ok: false,
          error: {
            kind: 'no answer',
            status: null,
            message: 'the client returned nothing: an HTTP error status or a connection failure'
          }
        }
      } else {
        line = { call: name, ok: true, answer }
      }
    } catch (error) {
      const known = error instanceof LabsMobileException
      line = {
        call: name,
        ok: false,
        error: {
          kind: known ? error.constructor.name : 'unexpected',
          status: known ? (error.status ?? null) : null,
          message: String(error.message)
        }
      }
    }
    if (!line.ok) failures += 1
    stdout.write(JSON.stringify(line) + '\n')
  }
} finally {
  process.chdir(tmpdir())
  rmSync(workDir, { recursive: true, force: true })
}

process.exitCode = failures === 0 ? 0 : 1
